"""Shapes on tiny configs, masking determinism, positions, config loading."""

from __future__ import annotations

import pytest
import torch

from core.config import ExperimentConfig, load_config
from core.errors import ConfigError
from core.masking import apply_masks, tube_mask
from core.model import apply_rope, build_model, rope_tables
from tests.helpers import tiny_dict


@pytest.mark.parametrize("pos", ["sincos", "rope"])
def test_forward_shapes(pos):
    cfg = ExperimentConfig.model_validate(tiny_dict(model={"pos": pos}))
    g = cfg.geometry
    model = build_model(cfg.model, g)
    video = torch.rand(3, 3, g.frames, g.size, g.size)
    keep, mask = tube_mask(3, g.grid, cfg.model.mask_ratio, torch.Generator().manual_seed(0))
    pix, lat = model(video, keep)
    assert pix.shape == (3, g.n_tokens, g.patch_dim)
    assert lat.shape == (3, g.n_tokens, cfg.model.dim)
    latent, outs = model.forward_encoder(video, keep, return_blocks=True)
    assert latent.shape == (3, keep.shape[1], cfg.model.dim)
    assert len(outs) == cfg.model.depth
    upto = model.forward_encoder(video, None, upto=2)
    assert torch.allclose(upto, model.forward_encoder(video, None, return_blocks=True)[1][1])


def test_patchify_matches_conv_token_order(tiny_cfg):
    """Token i of patchify must be the tubelet the Conv3d embeds as token i."""
    g = tiny_cfg.geometry
    model = build_model(tiny_cfg.model, g)
    video = torch.rand(2, 3, g.frames, g.size, g.size)
    patches = model.patchify(video)  # (B, N, patch_dim)
    w = model.patch_embed.weight  # (D, C, tt, p, p)
    # reorder the conv weight into patchify's (tt, p, p, C) channel order
    w_flat = w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)
    manual = patches @ w_flat.T + model.patch_embed.bias
    conv = model.patch_embed(video).flatten(2).transpose(1, 2)
    assert torch.allclose(manual, conv, atol=1e-5)
    # embed() applies the same map to visible tubelets only
    assert torch.allclose(model.embed(video), conv + model.pos_embed, atol=1e-5)
    keep = torch.tensor([[0, 3], [1, 2]])
    assert torch.allclose(model.embed(video, keep), apply_masks(conv + model.pos_embed, keep), atol=1e-5)


def test_predicting_at_masked_tokens_equals_the_full_decoder(tiny_cfg):
    """``pred_idx`` and patches as input are shortcuts: the same numbers as the full path."""
    g = tiny_cfg.geometry
    model = build_model(tiny_cfg.model, g)
    video = torch.rand(3, 3, g.frames, g.size, g.size)
    keep, mask = tube_mask(3, g.grid, tiny_cfg.model.mask_ratio, torch.Generator().manual_seed(1))
    pix, lat = model(video, keep)
    pix_m, lat_m = model(model.patchify(video), keep, pred_idx=mask)
    assert pix_m.shape == (3, mask.shape[1], g.patch_dim)
    assert torch.allclose(pix_m, apply_masks(pix, mask), atol=1e-6)
    assert torch.allclose(lat_m, apply_masks(lat, mask), atol=1e-6)


def test_normalised_patches_are_maes_unbiased_per_patch_normalisation():
    from core.objectives import normalise_patches

    x = torch.randn(4, 6, 24) * 3 + 1
    ref = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(normalise_patches(x), ref, atol=1e-5)
    flat = torch.full((1, 1, 24), 0.5)  # a blank patch: 0, not NaN
    assert torch.equal(normalise_patches(flat), torch.zeros_like(flat))
    assert normalise_patches(x, norm=False) is x


def test_tube_mask_deterministic_and_partition():
    grid = (4, 4, 4)
    a = tube_mask(5, grid, 0.75, torch.Generator().manual_seed(7))
    b = tube_mask(5, grid, 0.75, torch.Generator().manual_seed(7))
    c = tube_mask(5, grid, 0.75, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    keep, mask = a
    assert keep.shape == (5, 16) and mask.shape == (5, 48)
    for row_k, row_m in zip(keep, mask):
        assert sorted(row_k.tolist() + row_m.tolist()) == list(range(64))
        # tube masking: the same spatial positions are kept in every time step
        spatial = row_k % 16
        assert all(torch.equal(spatial[:4], spatial[i * 4 : (i + 1) * 4]) for i in range(4))


def test_apply_masks_gathers_rows():
    x = torch.arange(2 * 5 * 3).float().view(2, 5, 3)
    idx = torch.tensor([[0, 4], [2, 3]])
    out = apply_masks(x, idx)
    assert torch.equal(out[0, 1], x[0, 4]) and torch.equal(out[1, 0], x[1, 2])


def test_rope_is_relative():
    """Rotary attention scores depend only on coordinate differences."""
    hd = 12
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(cq, ck):
        rq = rope_tables(torch.tensor([[cq]], dtype=torch.float), hd)
        rk = rope_tables(torch.tensor([[ck]], dtype=torch.float), hd)
        return float((apply_rope(q, rq) * apply_rope(k, rk)).sum())

    assert score([1, 2, 3], [0, 1, 1]) == pytest.approx(score([3, 5, 4], [2, 4, 2]), abs=1e-4)
    assert score([1, 2, 3], [0, 1, 1]) != pytest.approx(score([1, 2, 3], [0, 0, 0]), abs=1e-4)


def test_config_rejects_unknown_key_and_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  depht: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown config key 'model.depht'"):
        load_config(p)


def test_config_overrides_and_geometry_checks(tmp_path):
    cfg = load_config("experiments/configs/mae_tiny.yaml", ["train.steps=7", "model.pos=rope"])
    assert cfg.train.steps == 7 and cfg.model.pos == "rope"
    with pytest.raises(ConfigError, match="not divisible"):
        load_config("experiments/configs/mae_tiny.yaml", ["data.size=30"])
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(None, ["data.name=video_folder"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("name", "objective"),
    [
        ("mae_tiny", "pixel"),
        ("mae_small", "pixel"),
        ("layerlock_tiny", "layerlock"),
        ("latent_naive_tiny", "latent_naive"),
    ],
)
def test_shipped_configs_load(name, objective):
    cfg = load_config(f"experiments/configs/{name}.yaml")
    assert cfg.objective.name == objective  # each file trains the method its name says
