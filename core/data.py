"""Video clip datasets, all offline: moving digits, camera motion over photographs, a user folder.

Every dataset yields ``{"video": (3, T, H, W) float32 in [0, 1], "labels": {task: tensor}}``;
:func:`collate` stacks items into ``(B, 3, T, H, W)`` and ``{task: (B, ...)}``.

Conventions shared by all datasets:

- Determinism: the procedural sets draw item ``i`` of a split from a numpy Generator seeded with
  ``(cfg.seed, split_id, i)`` only, so an item never depends on which items were read before it,
  on worker processes, or on the global RNG state.
- Directions are 8 classes in steps of 45 degrees counter-clockwise from east, as seen on screen:
  ``0=E, 1=NE, 2=N, 3=NW, 4=W, 5=SW, 6=S, 7=SE``. Image rows grow downwards, so "north" is
  decreasing row index.
- Depth (moving digits) is 1.0 for the far background and in [0.2, 0.8] on the digit; nearer
  digits are drawn bigger.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from core.config import DataConfig
from core.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".gif", ".mkv", ".mov")

# Unit steps (dx, dy) in image coordinates (x right, y down) for the 8 direction classes.
_ANGLES = np.deg2rad(45.0 * np.arange(8))
DIRECTION_STEPS = np.stack([np.cos(_ANGLES), -np.sin(_ANGLES)], axis=1)  # (8, 2)


@dataclass(frozen=True)
class Task:
    """One label a dataset provides, so probes know which head to fit."""

    name: str  # "digit", "direction", "depth", "motion", "class"
    kind: str  # "class": one int64 label per clip; "dense": float32 map (T, H, W) per clip
    n_classes: int | None  # number of classes for kind "class"; None for "dense"


def _item_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
    # SeedSequence needs non-negative entropy; the config allows any int seed.
    return np.random.default_rng([seed % 2**64, split_id, index])


def _class_label(value: int) -> torch.Tensor:
    return torch.tensor(int(value), dtype=torch.int64)


class ClipDataset(Dataset):
    """Base class: a fixed-length, indexable set of labelled clips of one split.

    ``__getitem__(i)`` returns ``{"video": (3, T, H, W) float32 in [0, 1],
    "labels": {task_name: tensor}}`` where a "class" label is an int64 scalar and a "dense"
    label is float32 ``(T, H, W)``.
    """

    tasks: dict[str, Task]
    skipped_files: int = 0  # video_folder only: unreadable files left out

    def __init__(self, cfg: DataConfig, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.cfg = cfg
        self.split = split
        self.split_id = SPLITS.index(split)
        self.frames = cfg.frames
        self.size = cfg.size
        self.tasks = {}
        self.skipped_files = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def _item(self, index: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        index = int(i)
        if index < 0:
            index += n
        if not 0 <= index < n:
            # IndexError (not DataError) keeps Python's sequence iteration protocol working.
            raise IndexError(f"clip index {i} out of range for {self.split} split of length {n}")
        return self._item(index)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, len={len(self)}, "
            f"frames={self.frames}, size={self.size}, tasks={sorted(self.tasks)})"
        )


# ----------------------------------------------------------------------------- moving digits


class MovingDigits(ClipDataset):
    """One handwritten sklearn digit drifting over a black canvas at a random depth.

    Labels: ``digit`` (10 classes), ``direction`` (8 classes, see module conventions) and
    ``depth`` (dense ``(T, H, W)``: 1.0 background, the digit's depth on its pixels).
    Train and val draw from disjoint digit images (first 80% / last 20% of sklearn's set).
    """

    TRAIN_FRACTION = 0.8
    DEPTH_RANGE = (0.2, 0.8)  # near, far
    SPRITE_FRACTION = (0.6, 0.3)  # sprite side / canvas side at the near and far depth
    SPEED_RANGE = (1.0, 2.0)  # pixels per frame
    MIN_SPEED = 0.5  # below this the motion is too small to label; clipping is allowed instead
    INK_THRESHOLD = 0.1  # sprite intensity above which a pixel belongs to the digit

    def __init__(self, cfg: DataConfig, split: str) -> None:
        super().__init__(cfg, split)
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

        digits = load_digits()
        n_train = int(len(digits.images) * self.TRAIN_FRACTION)
        part = slice(0, n_train) if split == "train" else slice(n_train, None)
        # (N, 1, 8, 8) in [0, 1]; sprites are upsampled per clip because the side is continuous
        # in depth, and one 8x8 -> s x s interpolation costs microseconds.
        self._images = torch.from_numpy(digits.images[part] / 16.0).float().unsqueeze(1)
        self._digit_labels = digits.target[part].astype(np.int64)
        self._length = cfg.train_clips if split == "train" else cfg.val_clips
        near, far = self.SPRITE_FRACTION
        self._sprite_near = max(4, min(self.size, round(near * self.size)))
        self._sprite_far = max(4, min(self.size, round(far * self.size)))
        self.tasks = {
            "digit": Task("digit", "class", 10),
            "direction": Task("direction", "class", 8),
            "depth": Task("depth", "dense", None),
        }

    def __len__(self) -> int:
        return self._length

    def sprite_side(self, depth: float) -> int:
        """Sprite side in pixels for a depth in DEPTH_RANGE: nearer is bigger."""
        near_d, far_d = self.DEPTH_RANGE
        frac = (far_d - depth) / (far_d - near_d)  # 1 at the near depth, 0 at the far one
        return round(self._sprite_far + frac * (self._sprite_near - self._sprite_far))

    def _sprite_track(self, rng: np.random.Generator) -> tuple[int, float, int, np.ndarray, np.ndarray]:
        """Draw one digit's (image index, depth, direction, sprite, (T, 2) top-left per frame)."""
        T, S = self.frames, self.size
        k = int(rng.integers(len(self._images)))
        depth = float(rng.uniform(*self.DEPTH_RANGE))
        direction = int(rng.integers(8))
        speed = float(rng.uniform(*self.SPEED_RANGE))

        side = self.sprite_side(depth)
        sprite = (
            F.interpolate(self._images[k : k + 1], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
            .clamp_(0, 1)
            .numpy()
        )  # (s, s)

        step = DIRECTION_STEPS[direction]
        if T > 1:
            # Slow down rather than clip when the path would leave the canvas (long clips,
            # big sprites), but keep enough motion for the direction to be visible.
            fit = (S - side) / ((T - 1) * np.abs(step).max())
            speed = max(min(speed, fit), self.MIN_SPEED)
        travel = step * speed * (T - 1)  # (dx, dy) over the whole clip
        start = np.array([_start_coord(rng, S, side, travel[0]), _start_coord(rng, S, side, travel[1])])
        path = np.rint(start + step * speed * np.arange(T)[:, None]).astype(int)  # (T, 2) as (x, y)
        return k, depth, direction, sprite, path

    def _item(self, index: int) -> dict:
        rng = _item_rng(self.cfg.seed, self.split_id, index)
        T, S = self.frames, self.size
        tracks = [self._sprite_track(rng) for _ in range(self.cfg.digits)]
        # Painter's order, far to near: a nearer digit's ink hides what is behind it. The labels
        # are the nearest digit's, so with several digits the probes must find the salient one.
        tracks.sort(key=lambda tr: -tr[1])
        canvas = np.zeros((T, S, S), dtype=np.float32)
        depth_map = np.ones((T, S, S), dtype=np.float32)
        layer = np.zeros((S, S), dtype=np.float32)
        for _, depth, _, sprite, path in tracks:
            for t in range(T):
                layer.fill(0.0)
                _paste(layer, sprite, top=path[t, 1], left=path[t, 0])
                ink = layer > self.INK_THRESHOLD
                canvas[t] = np.where(ink, layer, np.maximum(canvas[t], layer))
                depth_map[t][ink] = depth
        k, _, direction, _, _ = tracks[-1]

        video = torch.from_numpy(canvas).unsqueeze(0).repeat(3, 1, 1, 1)  # gray -> (3, T, S, S)
        return {
            "video": video,
            "labels": {
                "digit": _class_label(self._digit_labels[k]),
                "direction": _class_label(direction),
                "depth": torch.from_numpy(depth_map),
            },
        }


def _start_coord(rng: np.random.Generator, extent: int, side: int, travel: float) -> float:
    """Top-left start along one axis so a ``side`` sprite moving by ``travel`` stays in view."""
    lo = max(0.0, -travel)
    hi = extent - side - max(0.0, travel)
    if hi < lo:  # the path cannot fit: centre it and let both ends clip a little
        return (extent - side - travel) / 2
    return float(rng.uniform(lo, hi))


def _paste(frame: np.ndarray, sprite: np.ndarray, top: int, left: int) -> None:
    """Write ``sprite`` (s, s) into ``frame`` (H, W) at (top, left), clipping at the borders."""
    H, W = frame.shape
    s = sprite.shape[0]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + s, H), min(left + s, W)
    if y1 <= y0 or x1 <= x0:
        return
    patch = sprite[y0 - top : y1 - top, x0 - left : x1 - left]
    np.maximum(frame[y0:y1, x0:x1], patch, out=frame[y0:y1, x0:x1])


# ----------------------------------------------------------------------------- photo pans


# Bundled photographs: (name, loader). Each loader reads a file shipped inside the package
# (no pooch download); loaders that fail on a given install are skipped.
def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: left view

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


PHOTO_SOURCES: tuple[tuple[str, Callable[[], np.ndarray]], ...] = (
    ("astronaut", _skimage("astronaut")),
    ("camera", _skimage("camera")),
    ("chelsea", _skimage("chelsea")),
    ("china", _sklearn("china.jpg")),
    ("clock", _skimage("clock")),
    ("coffee", _skimage("coffee")),
    ("coins", _skimage("coins")),
    ("flower", _sklearn("flower.jpg")),
    ("grass", _skimage("grass")),
    ("gravel", _skimage("gravel")),
    ("hubble_deep_field", _skimage("hubble_deep_field")),
    ("immunohistochemistry", _skimage("immunohistochemistry")),
    ("moon", _skimage("moon")),
    ("motorcycle", _skimage("stereo_motorcycle")),
    ("rocket", _skimage("rocket")),
    ("brick", _skimage("brick")),
)


@functools.lru_cache(maxsize=4)
def _load_photos(short_side: int) -> tuple[tuple[str, torch.Tensor], ...]:
    """All loadable bundled photos as (name, (3, H, W) float32 in [0, 1]), short side <= given.

    Cached because train and val are built from the same decoded photos.
    """
    photos = []
    for name, load in PHOTO_SOURCES:
        try:
            image = np.asarray(load())
        except (ImportError, OSError, ValueError) as err:
            # Not bundled with this install (skimage raises ModuleNotFoundError when a file
            # would need a pooch download): use the other photos.
            logger.debug("photo_pans: skipping photo %s (%s)", name, err)
            continue
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        img = torch.from_numpy(np.array(image[:, :, :3], dtype=np.uint8)).permute(2, 0, 1)
        h, w = img.shape[1:]
        if min(h, w) > short_side:  # downscale once so every crop later is cheap
            from torchvision.transforms.v2 import functional as TF

            scale = short_side / min(h, w)
            img = TF.resize(img, [round(h * scale), round(w * scale)], antialias=True)
        photos.append((name, img.float().div_(255.0).contiguous()))
    return tuple(photos)


class PhotoPans(ClipDataset):
    """A virtual camera moving over real photographs.

    Label ``motion`` (10 classes): 0-7 pan, the direction the *camera window* moves (see module
    conventions; the picture content therefore drifts the opposite way on screen), 8 zoom in
    (window shrinks, content grows), 9 zoom out. Train and val use disjoint photos (every
    fourth photo is held out for val).
    """

    MOTIONS = ("pan_E", "pan_NE", "pan_N", "pan_NW", "pan_W", "pan_SW", "pan_S", "pan_SE", "zoom_in", "zoom_out")
    PAN_WINDOW = (0.45, 0.7)  # pan window side / photo short side
    PAN_SPEED = (1.0, 2.0)  # content speed in output pixels per frame
    ZOOM_WINDOW = (0.6, 0.95)  # largest zoom window side / photo short side
    ZOOM_RATE = (1.04, 1.08)  # window scale change per frame
    MAX_ZOOM = 3.0  # cap on the total scale change for long clips

    def __init__(self, cfg: DataConfig, split: str) -> None:
        super().__init__(cfg, split)
        # 4x the output side keeps crops sharp; at least 128 px so zooms have room.
        photos = _load_photos(max(128, 4 * self.size))
        if len(photos) < 2:
            raise DataError(
                "photo_pans: fewer than 2 bundled photographs could be loaded from scikit-image / scikit-learn"
            )
        held_out = [j % 4 == 3 for j in range(len(photos))]
        self.photo_names = [n for (n, _), v in zip(photos, held_out) if v == (split == "val")]
        self._photos = [p for (_, p), v in zip(photos, held_out) if v == (split == "val")]
        self._length = cfg.train_clips if split == "train" else cfg.val_clips
        self.tasks = {"motion": Task("motion", "class", len(self.MOTIONS))}

    def __len__(self) -> int:
        return self._length

    def _item(self, index: int) -> dict:
        rng = _item_rng(self.cfg.seed, self.split_id, index)
        photo = self._photos[int(rng.integers(len(self._photos)))]
        motion = int(rng.integers(len(self.MOTIONS)))
        _, H, W = photo.shape
        boxes = (
            self._pan_boxes(rng, motion, H, W) if motion < 8 else self._zoom_boxes(rng, zoom_in=motion == 8, H=H, W=W)
        )
        rois = torch.cat([torch.zeros(self.frames, 1), torch.from_numpy(boxes).float()], dim=1)
        # roi_align = bilinear crop-and-resize at sub-pixel box positions, averaging several
        # samples per output pixel (anti-aliasing) -- one call renders the whole clip.
        from torchvision.ops import roi_align  # imported here: moving_digits needs no torchvision

        clip = roi_align(
            photo.unsqueeze(0),
            rois,
            output_size=(self.size, self.size),
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        )  # (T, 3, S, S)
        return {
            "video": clip.clamp_(0, 1).permute(1, 0, 2, 3).contiguous(),
            "labels": {"motion": _class_label(motion)},
        }

    def _pan_boxes(self, rng: np.random.Generator, direction: int, H: int, W: int) -> np.ndarray:
        """(T, 4) boxes x0, y0, x1, y1 of a fixed-size window translating in ``direction``."""
        T = self.frames
        side = rng.uniform(*self.PAN_WINDOW) * min(H, W)
        step = DIRECTION_STEPS[direction] * rng.uniform(*self.PAN_SPEED) * side / self.size
        travel = step * max(T - 1, 1)
        room = np.array([W - side, H - side])
        # Shrink the speed if the path would leave the photo (long clips).
        shrink = min(1.0, *(room[a] / abs(travel[a]) for a in range(2) if abs(travel[a]) > 1e-9))
        step, travel = step * shrink, travel * shrink
        start = np.array([rng.uniform(max(0.0, -travel[a]), room[a] - max(0.0, travel[a])) for a in range(2)])
        tl = start + step * np.arange(T)[:, None]  # (T, 2) top-left corners
        return np.concatenate([tl, tl + side], axis=1)

    def _zoom_boxes(self, rng: np.random.Generator, zoom_in: bool, H: int, W: int) -> np.ndarray:
        """(T, 4) boxes of a window scaling about a fixed centre; zoom in = window shrinks."""
        T = self.frames
        largest = rng.uniform(*self.ZOOM_WINDOW) * min(H, W)
        rate = min(rng.uniform(*self.ZOOM_RATE), self.MAX_ZOOM ** (1 / max(T - 1, 1)))
        centre = np.array([rng.uniform(largest / 2, W - largest / 2), rng.uniform(largest / 2, H - largest / 2)])
        sides = largest / rate ** np.arange(T)  # shrinking: zoom in
        if not zoom_in:
            sides = sides[::-1]
        half = sides[:, None] / 2
        return np.concatenate([centre - half, centre + half], axis=1)


# ----------------------------------------------------------------------------- video folder


@dataclass(frozen=True)
class _DecodedFolder:
    clips: tuple[tuple[int, str, torch.Tensor], ...]  # (class index, path, (3, T, S, S) uint8)
    skipped: tuple[tuple[str, str], ...]  # (path, reason)


def _list_videos(root_arg: str | None) -> tuple[Path, list[str], list[tuple[int, Path]]]:
    """Validate the folder layout; return root, class names and (class index, file) pairs."""
    if not root_arg:
        raise DataError("data.root is required for data.name=video_folder")
    root = Path(root_arg).expanduser()
    if not root.exists():
        raise DataError(f"video folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"video folder is not a directory: {root}")
    per_class: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
        if files:  # a folder without videos is not a class
            per_class[sub.name] = files
    if not per_class:
        raise DataError(
            f"no videos found in {root}: expected {root}/<class>/<video> with "
            f"extensions {', '.join(e[1:] for e in VIDEO_EXTENSIONS)}"
        )
    classes = sorted(per_class)
    files = [(c, f) for c, name in enumerate(classes) for f in per_class[name]]
    return root, classes, files


def _center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size): centre crop to a square, then antialiased resize."""
    from torchvision.transforms.v2 import functional as TF

    side = min(image.shape[-2:])
    return TF.resize(TF.center_crop(image, [side, side]), [size, size], antialias=True)


def decode_clip(path: str | Path, frames: int, size: int, max_kept: int = 0) -> torch.Tensor:
    """Decode a video with PyAV and sample ``frames`` frames evenly across it.

    Returns ``(3, frames, size, size)`` uint8. Raises on any decoding error or an empty video.
    Memory stays bounded for long videos: at most ``max_kept`` (default ``max(4*frames, 64)``)
    frames are kept, halving the kept set and doubling the stride whenever it overflows, so the
    kept frames stay evenly spaced without knowing the frame count in advance (containers often
    do not report it reliably).
    """
    import av

    cap = max_kept or max(4 * frames, 64)
    kept: list[torch.Tensor] = []
    stride = 1
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for j, frame in enumerate(container.decode(stream)):
            if j % stride:
                continue
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            kept.append(_center_square(rgb, size))
            if len(kept) > cap:
                kept = kept[::2]  # the survivors sit at multiples of the doubled stride
                stride *= 2
    if not kept:
        raise ValueError("no decodable video frames")
    pick = np.linspace(0, len(kept) - 1, frames).round().astype(int)  # repeats if too short
    return torch.stack([kept[k] for k in pick], dim=1)


@functools.lru_cache(maxsize=1)
def _decode_folder(files: tuple[tuple[int, str, int, int], ...], frames: int, size: int) -> _DecodedFolder:
    """Decode every file once, with a progress bar on stderr (hidden when not a terminal).

    Cached (keyed by path, mtime and byte size of each file) so the train and val splits of one
    folder share a single decoding pass; the last decoded folder stays in memory.
    """
    from tqdm.auto import tqdm

    clips, skipped = [], []
    for c, path, _mtime, _nbytes in tqdm(files, desc="decoding videos", unit="file", disable=None):
        try:
            clips.append((c, path, decode_clip(path, frames, size)))
        except Exception as err:  # noqa: BLE001 -- av raises many types; all mean "unreadable"
            skipped.append((path, f"{type(err).__name__}: {err}"))
    return _DecodedFolder(tuple(clips), tuple(skipped))


class VideoFolder(ClipDataset):
    """The user's videos, ``root/<class>/*.{mp4,avi,webm,gif,mkv,mov}``, decoded once with PyAV.

    Label ``class`` (class folders sorted alphabetically). Each readable file is one clip of
    ``cfg.frames`` frames sampled evenly over the whole video, centre-cropped and resized to
    ``cfg.size``, cached in memory as uint8. The split is drawn per class over the readable
    files with ``cfg.seed``: about 20% to val, at least one when a class has two or more files.
    ``skipped_files`` counts unreadable files in the whole folder (the split is drawn after
    decoding, so they belong to neither split).
    """

    VAL_FRACTION = 0.2

    def __init__(self, cfg: DataConfig, split: str) -> None:
        super().__init__(cfg, split)
        root, self.classes, files = _list_videos(cfg.root)
        key = tuple((c, str(f), *_stat(f)) for c, f in files)
        decoded = _decode_folder(key, self.frames, self.size)
        for path, reason in decoded.skipped:
            warnings.warn(f"skipping unreadable video {path} ({reason})", stacklevel=3)
        self.skipped_files = len(decoded.skipped)
        if not decoded.clips:
            raise DataError(f"none of the {len(files)} videos in {root} could be decoded")

        by_class: dict[int, list[int]] = {}
        for j, (c, _, _) in enumerate(decoded.clips):
            by_class.setdefault(c, []).append(j)
        chosen: list[int] = []
        for c, members in sorted(by_class.items()):
            order = np.random.default_rng([cfg.seed % 2**64, c]).permutation(len(members))
            n_val = max(1, round(self.VAL_FRACTION * len(members))) if len(members) >= 2 else 0
            part = order[:n_val] if split == "val" else order[n_val:]
            chosen.extend(members[k] for k in sorted(part))
        if not chosen:
            raise DataError(
                f"the {split} split of {root} is empty: a class needs at least 2 readable videos to put one in val"
            )
        self.paths = [decoded.clips[j][1] for j in chosen]
        self._labels = [decoded.clips[j][0] for j in chosen]
        self._videos = [decoded.clips[j][2] for j in chosen]  # shared with the cache, read-only
        self.tasks = {"class": Task("class", "class", len(self.classes))}

    def __len__(self) -> int:
        return len(self._videos)

    def _item(self, index: int) -> dict:
        return {
            "video": self._videos[index].float().div_(255.0),
            "labels": {"class": _class_label(self._labels[index])},
        }


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


# ----------------------------------------------------------------------------- public API

_BUILDERS: dict[str, type[ClipDataset]] = {
    "moving_digits": MovingDigits,
    "photo_pans": PhotoPans,
    "video_folder": VideoFolder,
}


def build_dataset(cfg: DataConfig, split: str = "train") -> ClipDataset:
    """The ``split`` ("train" or "val") of the dataset named by ``cfg.name``.

    Raises DataError for an unknown name or an unusable video folder.
    """
    builder = _BUILDERS.get(cfg.name)
    if builder is None:
        raise DataError(f"unknown dataset '{cfg.name}'; choose one of {', '.join(_BUILDERS)}")
    return builder(cfg, split)


def collate(items: Sequence[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stack items: video ``(B, 3, T, H, W)``; labels ``(B,)`` int64 or ``(B, T, H, W)``."""
    if not items:
        raise ValueError("cannot collate an empty list of clips")
    video = torch.stack([it["video"] for it in items])
    labels = {k: torch.stack([it["labels"][k] for it in items]) for k in items[0]["labels"]}
    return video, labels


def get_batch(ds: ClipDataset, indices: Iterable[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``collate([ds[i] for i in indices])``; ``indices`` may be a list, range or tensor."""
    return collate([ds[int(i)] for i in indices])


__all__ = [
    "DIRECTION_STEPS",
    "VIDEO_EXTENSIONS",
    "ClipDataset",
    "MovingDigits",
    "PhotoPans",
    "Task",
    "VideoFolder",
    "build_dataset",
    "collate",
    "decode_clip",
    "get_batch",
]
