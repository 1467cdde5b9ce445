"""Shapes, determinism, label semantics and failure modes of the clip datasets (tiny configs)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import DataConfig
from core.data import (
    DIRECTION_STEPS,
    ClipDataset,
    Task,
    build_dataset,
    collate,
    decode_clip,
    get_batch,
)
from core.errors import DataError
from tests.helpers import write_video

T, S = 8, 32


def tiny(name: str = "moving_digits", **kw) -> DataConfig:
    return DataConfig(name=name, frames=T, size=S, train_clips=64, val_clips=16, **kw)


def check_item(ds: ClipDataset, item: dict) -> None:
    video = item["video"]
    assert video.shape == (3, T, S, S) and video.dtype == torch.float32
    assert 0.0 <= video.min() and video.max() <= 1.0
    assert set(item["labels"]) == set(ds.tasks)
    for name, task in ds.tasks.items():
        label = item["labels"][name]
        if task.kind == "class":
            assert label.shape == () and label.dtype == torch.int64
            assert 0 <= int(label) < task.n_classes
        else:
            assert task.kind == "dense" and task.n_classes is None
            assert label.shape == (T, S, S) and label.dtype == torch.float32


# ----------------------------------------------------------------------------- procedural sets


@pytest.mark.parametrize("name", ["moving_digits", "photo_pans"])
def test_procedural_shapes_lengths_and_batches(name: str) -> None:
    train, val = build_dataset(tiny(name)), build_dataset(tiny(name), "val")
    assert (len(train), len(val)) == (64, 16)
    for i in (0, 5, 63, -1):
        check_item(train, train[i])
    check_item(val, val[15])
    with pytest.raises(IndexError):
        train[64]
    video, labels = get_batch(train, torch.arange(4))
    assert video.shape == (4, 3, T, S, S)
    for k, task in train.tasks.items():
        assert labels[k].shape == ((4,) if task.kind == "class" else (4, T, S, S))
    ref_video, _ = collate([train[i] for i in range(4)])
    assert torch.equal(video, ref_video)


def test_tasks_declared() -> None:
    assert build_dataset(tiny()).tasks == {
        "digit": Task("digit", "class", 10),
        "direction": Task("direction", "class", 8),
        "depth": Task("depth", "dense", None),
    }
    assert build_dataset(tiny("photo_pans")).tasks == {"motion": Task("motion", "class", 10)}


@pytest.mark.parametrize("name", ["moving_digits", "photo_pans"])
def test_deterministic_per_seed_split_and_index(name: str) -> None:
    a, b = build_dataset(tiny(name)), build_dataset(tiny(name))
    _ = [a[i] for i in range(7)]  # reading other items first must not change item 3
    for i in (3, 10):
        x, y = a[i], b[i]
        assert torch.equal(x["video"], y["video"])
        assert all(torch.equal(x["labels"][k], y["labels"][k]) for k in x["labels"])
    other = build_dataset(tiny(name, seed=1))
    assert not torch.equal(get_batch(a, range(4))[0], get_batch(other, range(4))[0])
    assert not torch.equal(a[0]["video"], a[1]["video"])


def test_seed_range_is_validated_and_items_are_reproducible() -> None:
    # Seeds are 0..2^31-1 (the config rejects others with a message naming the key); within
    # the range an item is a pure function of (seed, split, index).
    from core.config import config_from_dict
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="data.seed"):
        config_from_dict({"data": {"seed": -3}})
    big = 2**31 - 1
    assert torch.equal(build_dataset(tiny(seed=big))[0]["video"], build_dataset(tiny(seed=big))[0]["video"])
    assert not torch.equal(build_dataset(tiny(seed=big))[0]["video"], build_dataset(tiny(seed=0))[0]["video"])


@pytest.mark.parametrize("name", ["moving_digits", "photo_pans"])
def test_train_and_val_do_not_overlap(name: str) -> None:
    train, val = (
        get_batch(build_dataset(tiny(name)), range(64))[0],
        get_batch(build_dataset(tiny(name), "val"), range(16))[0],
    )
    flat_t, flat_v = train.flatten(1), val.flatten(1)
    assert torch.cdist(flat_v, flat_t).min() > 0  # no val clip equals any train clip


def _centroid(frame: torch.Tensor) -> np.ndarray:
    """(H, W) intensity -> (x, y) centroid in pixels."""
    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    m = frame.sum()
    return np.array([(frame * xs).sum() / m, (frame * ys).sum() / m])


def test_moving_digits_direction_label_matches_motion() -> None:
    ds = build_dataset(tiny())
    video, labels = get_batch(ds, range(64))
    for clip, direction in zip(video, labels["direction"].tolist()):
        shift = _centroid(clip[0, -1]) - _centroid(clip[0, 0])  # (dx, dy), y down
        assert np.linalg.norm(shift) > 4, "digit barely moves"
        cos = shift @ DIRECTION_STEPS[direction] / np.linalg.norm(shift)
        assert cos > np.cos(np.deg2rad(22.5)), (direction, shift)  # nearest of the 8 directions
    assert set(labels["direction"].tolist()) == set(range(8))


def test_moving_digits_depth_map_and_sprite_size() -> None:
    ds = build_dataset(tiny())
    video, labels = get_batch(ds, range(32))
    depth = labels["depth"]
    ink = video[:, 0] > ds.INK_THRESHOLD
    assert torch.all(depth[~ink] == 1.0)  # background is far
    assert torch.all((depth[ink] >= 0.2) & (depth[ink] <= 0.8))  # digit pixels are nearer
    assert ink.any(dim=(2, 3)).all()  # the digit is visible in every frame
    per_clip = [depth[b][ink[b]].unique() for b in range(32)]
    assert all(len(u) == 1 for u in per_clip)  # one depth per digit
    d = torch.stack([u[0] for u in per_clip])
    area = ink.float().mean(dim=(1, 2, 3))
    # nearer digits are drawn bigger
    assert np.corrcoef(d.numpy(), area.numpy())[0, 1] < -0.5
    assert ds.sprite_side(0.2) > ds.sprite_side(0.8)


def test_moving_digits_several_digits_nearest_is_labelled_and_occludes() -> None:
    ds = build_dataset(tiny(digits=3))
    video, labels = get_batch(ds, range(48))
    depth = labels["depth"]
    several = 0
    for clip, d, direction in zip(video, depth, labels["direction"].tolist()):
        near = d.min()
        assert near < 1.0
        nearest = d == near  # the labelled digit's pixels: never hidden by another digit
        assert nearest.any(dim=(1, 2)).all()
        several += len(d[d < 1.0].unique()) > 1
        shift = _centroid(nearest[-1].float()) - _centroid(nearest[0].float())
        if np.linalg.norm(shift) > 4:  # the label is the nearest digit's direction
            cos = shift @ DIRECTION_STEPS[direction] / np.linalg.norm(shift)
            assert cos > np.cos(np.deg2rad(30.0)), (direction, shift)
        assert torch.all(clip[0][d < 1.0] > ds.INK_THRESHOLD)  # depth marks ink only
    assert several > 24  # most clips show more than one digit


def test_photo_pans_clips_move() -> None:
    ds = build_dataset(tiny("photo_pans"))
    video, labels = get_batch(ds, range(32))
    assert video.flatten(2).std(dim=2).min() > 0.01  # no constant frames
    frame_diff = (video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # (B, T-1)
    assert (frame_diff > 1e-3).all()  # every consecutive pair of frames differs
    assert len(set(labels["motion"].tolist())) >= 8
    assert set(ds.photo_names).isdisjoint(build_dataset(tiny("photo_pans"), "val").photo_names)


def test_photo_pans_pan_moves_content_against_camera() -> None:
    """Camera panning east: frame t+1 equals frame t shifted left (content drifts west)."""
    ds = build_dataset(tiny("photo_pans"))
    checked = 0
    for i in range(64):
        item = ds[i]
        if int(item["labels"]["motion"]) != 0:
            continue
        clip = item["video"].mean(0)  # (T, H, W)
        a, b = clip[0], clip[1]
        errs = {dx: (a[:, 8 + dx : 24 + dx] - b[:, 8:24]).abs().mean().item() for dx in range(-3, 4)}
        assert min(errs, key=errs.get) > 0  # b[x] = a[x + dx] with dx > 0: content moved west
        checked += 1
    assert checked >= 2


def test_unknown_name_and_split() -> None:
    cfg = tiny().model_construct(name="nope")  # bypasses pydantic validation on purpose
    with pytest.raises(DataError, match="nope"):
        build_dataset(cfg)
    with pytest.raises(ValueError):
        build_dataset(tiny(), "test")


# ----------------------------------------------------------------------------- video folder


@pytest.fixture
def video_root(tmp_path: Path) -> Path:
    """root/red: mp4, avi, gif; root/blue: 3 mp4 + a corrupt bad.mp4; plus distractions."""
    root = tmp_path / "videos"
    red, blue = root / "red", root / "blue"
    red.mkdir(parents=True)
    blue.mkdir()
    write_video(red / "r0.mp4", (200, 0, 0))
    write_video(red / "r1.avi", (200, 0, 0), codec="mpeg4")
    write_video(red / "r2.gif", (200, 0, 0), codec="gif")
    for k in range(3):
        write_video(blue / f"b{k}.mp4", (0, 0, 200))
    (blue / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(2048))
    (blue / "notes.txt").write_text("not a video")
    (root / "empty_class").mkdir()  # no videos: not a class
    return root


def test_video_folder_loads_skips_corrupt_and_labels(video_root: Path) -> None:
    cfg = tiny("video_folder", root=str(video_root))
    with pytest.warns(UserWarning, match="bad.mp4"):
        train = build_dataset(cfg, "train")
    with pytest.warns(UserWarning, match="bad.mp4"):  # every build reports it
        val = build_dataset(cfg, "val")
    assert train.skipped_files == 1 and val.skipped_files == 1
    assert train.classes == ["blue", "red"]
    assert train.tasks == {"class": Task("class", "class", 2)}
    assert (len(train), len(val)) == (4, 2)
    assert set(train.paths).isdisjoint(val.paths)
    assert not any(p.endswith("bad.mp4") for p in train.paths + val.paths)
    _, labels = get_batch(val, range(len(val)))
    assert sorted(labels["class"].tolist()) == [0, 1]  # one val file per class
    for ds in (train, val):
        for i in range(len(ds)):
            item = ds[i]
            check_item(ds, item)
            red, blue = item["video"][0].mean(), item["video"][2].mean()
            assert (red > blue) == (int(item["labels"]["class"]) == 1), ds.paths[i]
            # frames are sampled across the video, so the moving bar makes them differ
            assert not torch.equal(item["video"][:, 0], item["video"][:, -1])


def test_video_folder_split_is_seeded(video_root: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = build_dataset(tiny("video_folder", root=str(video_root)), "val").paths
        b = build_dataset(tiny("video_folder", root=str(video_root)), "val").paths
    assert a == b


def test_decode_clip_keeps_long_videos_bounded(tmp_path: Path) -> None:
    path = tmp_path / "long.mp4"
    write_video(path, (0, 120, 0), n=11)
    clip = decode_clip(path, frames=4, size=16, max_kept=3)  # forces two stride doublings
    assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.uint8
    # the bar (4 px per frame on a 48 px wide video) must advance across the sampled frames
    bar_x = [int(clip[0, t].float().mean(0).argmax()) for t in range(4)]
    assert bar_x == sorted(bar_x) and bar_x[-1] > bar_x[0]


def test_video_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        build_dataset(tiny("video_folder", root=str(tmp_path / "missing")))
    with pytest.raises(DataError, match=str(tmp_path)):
        build_dataset(tiny("video_folder", root=str(tmp_path)))  # empty folder
    (tmp_path / "file.mp4").write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        build_dataset(tiny("video_folder", root=str(tmp_path / "file.mp4")))
    with pytest.raises(DataError, match="required"):
        build_dataset(tiny("video_folder"))
    bad = tmp_path / "only_bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "x.mp4").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="could be decoded"):
        build_dataset(tiny("video_folder", root=str(tmp_path / "only_bad")))
