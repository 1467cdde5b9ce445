"""Readout probes: they learn what is learnable, not what is not; shapes of features and targets."""

from __future__ import annotations

import pytest
import torch

from core.config import ExperimentConfig
from core.errors import LayerLockError
from core.model import build_model
from core.readout import (
    AttentiveProbe,
    DenseProbe,
    LinearProbe,
    ProbeSettings,
    depth_metrics,
    evaluate_encoder,
    extract_features,
    fit_probe,
    load_eval_data,
    pool_dense_targets,
    select_tasks,
    whitening,
)

N_CLASSES, N_TOKENS, DIM = 4, 16, 16
FAST = ProbeSettings(epochs=15, batch_size=32)


def toy_tokens(n: int, seed: int, shuffle_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise tokens ``(n, 16, 16)``; in each sample one random token carries its class direction.

    The class is only in that token (an attentive probe has to find it); it is strong enough
    to survive mean pooling too (a linear probe on the mean can read it).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_TOKENS, DIM, generator=g)
    y = torch.randint(N_CLASSES, (n,), generator=g)
    directions = torch.eye(DIM)[:N_CLASSES] * 16.0
    where = torch.randint(N_TOKENS, (n,), generator=g)
    x[torch.arange(n), where] += directions[y]
    if shuffle_labels:
        y = y[torch.randperm(n, generator=g)]
    return x, y


@pytest.mark.parametrize("kind", ["attentive", "linear"])
def test_probe_learns_a_separable_task(kind):
    xt, yt = toy_tokens(256, seed=0)
    xv, yv = toy_tokens(128, seed=1)
    acc = fit_probe(kind, xt, yt, xv, yv, n_classes=N_CLASSES, settings=FAST)["acc"]
    assert acc > 0.9


@pytest.mark.parametrize("kind", ["attentive", "linear"])
def test_probe_stays_near_chance_on_shuffled_labels(kind):
    xt, yt = toy_tokens(256, seed=0, shuffle_labels=True)
    xv, yv = toy_tokens(256, seed=1, shuffle_labels=True)
    acc = fit_probe(kind, xt, yt, xv, yv, n_classes=N_CLASSES, settings=FAST)["acc"]
    assert acc < 1 / N_CLASSES + 0.15


def test_fit_is_reproducible_and_leaves_global_rng_alone():
    xt, yt = toy_tokens(128, seed=0)
    xv, yv = toy_tokens(64, seed=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = fit_probe("attentive", xt, yt, xv, yv, n_classes=N_CLASSES, settings=ProbeSettings(epochs=3), seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = fit_probe("attentive", xt, yt, xv, yv, n_classes=N_CLASSES, settings=ProbeSettings(epochs=3), seed=5)
    assert a == b


def test_dense_probe_learns_a_linear_per_token_target():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(DIM, generator=g) * 0.05
    x = torch.randn(320, N_TOKENS, DIM, generator=g)
    y = x @ w + 1.0  # in about [0.4, 1.6]: positive, like depth
    res = fit_probe("dense", x[:256], y[:256], x[256:], y[256:], settings=FAST)
    assert res["absrel"] < 0.05
    assert res["delta1"] > 0.95


def test_probe_heads_output_shapes():
    x = torch.randn(3, 10, 12)
    assert AttentiveProbe(dim=12, n_out=5, heads=2, n_queries=3)(x).shape == (3, 5)
    assert LinearProbe(dim=12, n_out=5)(x).shape == (3, 5)
    assert DenseProbe(dim=12)(x).shape == (3, 10)


def test_depth_metrics_known_values():
    gt = torch.tensor([1.0, 1.0, 0.5, 0.5])
    pred = torch.tensor([1.0, 1.1, 0.5, 2.0])
    m = depth_metrics(pred, gt)
    assert m["absrel"] == pytest.approx((0 + 0.1 + 0 + 3.0) / 4)
    assert m["delta1"] == pytest.approx(0.75)
    assert depth_metrics(torch.tensor([-1.0]), torch.tensor([1.0]))["absrel"] < 1.0  # clamped, finite


def test_whitening_gives_identity_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    mean, w = whitening(x, shrink=0.0)
    z = ((x - mean) @ w).reshape(-1, 6)
    assert torch.allclose(torch.cov(z.T), torch.eye(6), atol=1e-3)


# ----------------------------------------------------------------------------- with the model


@pytest.fixture(scope="module")
def tiny() -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "model": {"depth": 2, "dim": 24, "heads": 2, "decoder_dim": 16, "decoder_heads": 2},
            "data": {"frames": 4, "size": 16, "train_clips": 32, "val_clips": 16},
        }
    )


def test_pool_dense_targets_matches_token_grid(tiny):
    g = tiny.geometry  # frames 4, size 16, tubelet 2, patch 8 -> grid (2, 2, 2)
    maps = torch.zeros(3, 4, 16, 16)
    maps[:, 2:, :8, 8:] = 1.0  # second tubelet in time, top row, right column: token (1, 0, 1)
    pooled = pool_dense_targets(maps, g)
    assert pooled.shape == (3, g.n_tokens)
    t, h, w = g.grid
    assert pooled[0].tolist() == [1.0 if i == 1 * h * w + 0 * w + 1 else 0.0 for i in range(g.n_tokens)]


def test_extract_features_shapes_and_blocks(tiny):
    torch.manual_seed(0)
    model = build_model(tiny.model, tiny.geometry)
    model.train()
    video = torch.rand(5, 3, 4, 16, 16)
    n, d = tiny.geometry.n_tokens, tiny.model.dim

    final = extract_features(model, video, batch_size=2, progress=False)
    assert list(final) == ["final"] and final["final"].shape == (5, n, d)
    one = extract_features(model, video, block=1, progress=False)
    assert list(one) == [1] and one[1].shape == (5, n, d)
    every = extract_features(model, [video[:3], video[3:]], block="all", progress=False)
    assert list(every) == [0, 1] and all(v.shape == (5, n, d) and v.dtype == torch.float32 for v in every.values())
    assert model.training  # mode restored

    model.eval()
    with torch.no_grad():
        ref_final, ref_blocks = model.forward_encoder(video, None, return_blocks=True)
    assert torch.allclose(final["final"], ref_final, atol=1e-5)
    assert torch.allclose(every[0], ref_blocks[0], atol=1e-5)
    assert torch.allclose(one[1], every[1])
    with pytest.raises(LayerLockError):
        extract_features(model, video, block=2, progress=False)


def test_evaluate_encoder_keys(tiny):
    torch.manual_seed(0)
    model = build_model(tiny.model, tiny.geometry)
    data = load_eval_data(tiny, progress=False)
    assert len(data.train_video) == 32 and len(data.val_video) == 16
    assert data.val_labels["depth"].shape == (16, tiny.geometry.n_tokens)
    quick = ProbeSettings(epochs=2)
    out = evaluate_encoder(
        model, tiny, data=data, probe="both", per_block=True, settings=quick, block_settings=quick, progress=False
    )
    expected = {
        "eval/digit/acc",
        "eval/direction/acc",
        "eval/depth/absrel",
        "eval/depth/delta1",
        "eval/digit/linear_acc",
        "eval/direction/linear_acc",
    }
    expected |= {
        f"eval/{t}/block_{i:02d}/{m}"
        for i in range(2)
        for t, m in [("digit", "acc"), ("direction", "acc"), ("depth", "absrel"), ("depth", "delta1")]
    }
    assert set(out) == expected
    only = evaluate_encoder(model, tiny, ["direction"], data=data, probe="linear", settings=quick, progress=False)
    assert set(only) == {"eval/direction/linear_acc"}
    assert data.chance("digit") == {"acc": 0.1}
    assert 0 < data.chance("depth")["absrel"]


def test_unknown_task_lists_the_valid_ones(tiny):
    with pytest.raises(LayerLockError, match="digit, direction, depth"):
        select_tasks({"digit": None, "direction": None, "depth": None}, ["colour"])
