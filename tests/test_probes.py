"""Probes: fixed token positions, position-centred CKA and collapse indicators, feature storage."""

from __future__ import annotations

import pytest
import torch

from core.cka import linear_cka
from core.config import ExperimentConfig
from core.errors import LayerLockError
from core.model import build_model
from core.probes import STORE_DTYPE, ProbeRunner, centre_positions, feature_stats, probe_cka, probe_positions
from tests.helpers import tiny_dict

CLIPS, POSITIONS, DIM = 32, 32, 128  # the default probe geometry on mae_tiny


def _position_table(scale: float, seed: int = 0) -> torch.Tensor:
    """A fixed per-position signal ``(1, P, D)``, the same for every clip (like the sin-cos table)."""
    return scale * torch.randn(1, POSITIONS, DIM, generator=torch.Generator().manual_seed(seed))


def _content(seed: int) -> torch.Tensor:
    return torch.randn(CLIPS, POSITIONS, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_feat_std_ignores_the_position_signal_whatever_its_size(scale):
    pos = _position_table(scale)
    with_content = feature_stats(pos + _content(1))
    position_only = feature_stats(pos.expand(CLIPS, -1, -1).clone())
    assert position_only["feat_std"] < 0.05 * with_content["feat_std"]
    assert position_only["eff_rank"] == 0.0  # nothing varies across clips at a fixed position
    assert with_content["eff_rank"] > 0.5 * DIM  # isotropic content keeps most directions
    if scale < 1:  # content dominates: a healthy block reads ~1
        assert 0.9 < with_content["feat_std"] < 1.1
        assert with_content["position_share"] < 0.05
    else:  # the old pooled measure would have seen mostly position
        assert with_content["position_share"] > 0.9


def test_feat_std_sees_collapse_to_one_direction():
    direction = torch.randn(1, 1, DIM)
    collapsed = direction * (1 + 0.01 * torch.rand(CLIPS, POSITIONS, 1)) + 1e-3 * _content(2)
    assert feature_stats(collapsed)["feat_std"] < 0.05 * feature_stats(_content(3))["feat_std"]


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_cka_of_blocks_sharing_only_the_position_signal_is_near_zero(scale):
    pos = _position_table(scale)
    x, y = pos + _content(1), pos + _content(2)
    # Debiased: unrelated content gives 0 in expectation; at 1024 rows x 128 dims its spread across
    # seeds is ~0.002 (README, Probes), so 0.02 is a margin of about 10 standard deviations.
    assert abs(probe_cka(x, y, debiased=True)) < 0.02
    # Biased: position centring removes the shared signal exactly, leaving the estimator's own
    # floor for unrelated content (~dim / rows = 0.11 here), identical to content without position.
    floor = probe_cka(_content(1), _content(2), debiased=False)
    assert probe_cka(x, y, debiased=False) == pytest.approx(floor, abs=1e-6)
    assert floor < 0.15
    if scale > 1:  # without the centring, the shared position table would dominate the CKA
        assert linear_cka(x.flatten(0, 1).double(), y.flatten(0, 1).double()) > 0.9


@pytest.mark.parametrize("debiased", [False, True])
def test_same_features_give_cka_one(debiased):
    x = _position_table(3.0) + _content(4)
    assert probe_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-9)
    assert probe_cka(x, x.to(STORE_DTYPE), debiased) == pytest.approx(1.0, abs=1e-4)


def test_centring_is_per_position_over_clips():
    x = _position_table(5.0) + _content(5)
    c = centre_positions(x)
    assert c.shape == x.shape
    assert c.mean(dim=0).abs().max() < 1e-5
    assert c.dtype == torch.float64
    assert torch.allclose(c, (x - x.mean(dim=0, keepdim=True)).double(), atol=1e-5)


def test_bad_feature_shapes_raise_one_clear_error():
    with pytest.raises(LayerLockError, match="clips, positions, dim"):
        feature_stats(torch.randn(32, 128))
    with pytest.raises(LayerLockError, match="at least 2 clips"):
        feature_stats(torch.randn(1, 4, 8))
    with pytest.raises(LayerLockError, match="different clips/positions"):
        probe_cka(torch.randn(4, 3, 8), torch.randn(4, 2, 8))


def _runner(tokens_per_clip: int = 4):
    cfg = ExperimentConfig.model_validate(tiny_dict(probe={"batch_size": 8, "tokens_per_clip": tokens_per_clip}))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.geometry)
    g = cfg.geometry
    video = torch.rand(cfg.probe.batch_size, 3, g.frames, g.size, g.size)
    return cfg, model, video, ProbeRunner(cfg.probe, video, g.n_tokens, seed=0)


def test_runner_reads_every_clip_at_the_same_positions():
    cfg, model, video, runner = _runner(tokens_per_clip=4)
    n = cfg.geometry.n_tokens
    assert runner.positions.shape == (4,) and runner.positions.unique().numel() == 4 and runner.positions.max() < n
    assert torch.equal(runner.positions, ProbeRunner(cfg.probe, video, n, seed=0).positions)  # fixed by the seed
    feats = runner.extract(model)
    with torch.no_grad():
        _, outs = model.forward_encoder(video, None, return_blocks=True)
    assert len(feats) == cfg.model.depth
    for f, o in zip(feats, outs):
        assert f.shape == (8, 4, cfg.model.dim)
        for clip in range(8):
            assert torch.equal(f[clip], o[clip, runner.positions])
    assert torch.equal(probe_positions(n, n + 5), torch.arange(n))  # short clips: every token
    assert torch.equal(probe_positions(n, n), torch.arange(n))


def test_stored_features_are_bfloat16_position_centred_and_cannot_overflow():
    cfg, model, video, runner = _runner()
    with torch.no_grad():
        model.patch_embed.weight.mul_(1e6)  # activations far beyond float16's 65504
    raw = runner.extract(model)
    assert torch.isinf(raw[0].half()).any()  # float16 storage would overflow here
    metrics = runner.probe(model, 0)
    stored = runner.features[0]
    assert all(f.dtype == torch.bfloat16 and f.shape == (8, 4, cfg.model.dim) for f in stored)
    assert all(torch.isfinite(f.float()).all() for f in stored)
    assert torch.allclose(stored[0].double(), centre_positions(raw[0]), rtol=1e-2, atol=1e-2 * float(raw[0].std()))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_probe_twice_on_same_weights_gives_cka_one_and_resume_checks_positions():
    cfg, model, video, runner = _runner()
    runner.probe(model, 0)
    second = runner.probe(model, 5)
    for b in range(cfg.model.depth):
        assert second[f"cka_prev/block_{b:02d}"] == pytest.approx(1.0, abs=1e-9)
        assert second[f"cka_init/block_{b:02d}"] == pytest.approx(1.0, abs=1e-9)
    assert all(v == pytest.approx(1.0, abs=1e-9) for vals in runner.final().values() for v in vals.values())
    fresh = ProbeRunner(cfg.probe, video, cfg.geometry.n_tokens, seed=0)
    state = runner.state_dict()
    assert set(state) == {"steps", "positions"}  # features live in their own files, one per probe
    stored = {runner.features_at(i)["step"]: runner.features_at(i)["features"] for i in range(2)}
    fresh.load_state_dict(state, stored.__getitem__)
    assert fresh.steps == [0, 5] and fresh.final() == runner.final()
    old_format = {"steps": [0], "features": [[torch.zeros(32, cfg.model.dim, dtype=torch.float16)]]}
    with pytest.raises(LayerLockError, match="other token positions"):
        fresh.load_state_dict(old_format)


def test_one_pass_over_blocks_of_a_shape_gives_each_blocks_own_numbers():
    """The probe computes its metrics once per group of blocks of one shape; every block's
    numbers must be those of the one-block functions, whatever the grouping (two widths
    interleaved, one block constant across clips, i.e. CKA 0 and effective rank 0)."""
    torch.manual_seed(0)
    widths = [16, 24, 16, 24, 16]
    first = [torch.randn(8, 6, w) for w in widths]
    first[2] = torch.randn(1, 6, 16).expand(8, -1, -1).clone()  # position only: constant across clips
    later = [f + 0.3 * torch.randn_like(f) for f in first]
    later[2] = first[2].clone()
    rounds = iter([first, later])
    runner = ProbeRunner(
        ExperimentConfig().probe, torch.zeros(8), blocks=[torch.nn.Identity()] * 5, forward=lambda batch: None
    )
    runner.extract = lambda *args, **kwargs: next(rounds)
    runner.probe(None, 0)
    metrics = runner.probe(None, 10)
    stored = runner.features
    for b, w in enumerate(widths):
        assert stored[1][b].shape == (8, 6, w) and stored[1][b].dtype == STORE_DTYPE
        stats = feature_stats(later[b])
        for key in ("eff_rank", "feat_std"):
            assert metrics[f"{key}/block_{b:02d}"] == pytest.approx(stats[key], rel=1e-9, abs=1e-12)
        for key, other in (("cka_prev", stored[0][b]), ("cka_init", stored[0][b])):
            assert metrics[f"{key}/block_{b:02d}"] == pytest.approx(
                probe_cka(stored[1][b], other, True), rel=1e-9, abs=1e-12
            )
    assert metrics["cka_prev/block_02"] == 0.0 and metrics["eff_rank/block_02"] == 0.0
    assert 0.5 < metrics["cka_prev/block_01"] < 1.0
    final = runner.final()[0]
    assert final["cka_final/block_03"] == pytest.approx(probe_cka(stored[0][3], stored[1][3], True), rel=1e-9)
