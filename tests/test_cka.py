"""Tests for core.cka against independent, deliberately naive float64 numpy references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from core.cka import CKAAccumulator, effective_rank, linear_cka

# --------------------------------------------------------------------------------------------
# Independent references: literal textbook formulas, n x n matrices, no shortcuts.
# --------------------------------------------------------------------------------------------


def ref_hsic_biased(x: np.ndarray, y: np.ndarray) -> float:
    """Gretton et al. biased HSIC with linear kernels: tr(K H L H) / (n-1)^2 (uncentred input)."""
    n = x.shape[0]
    k = x @ x.T
    l_ = y @ y.T
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l_ @ h)) / (n - 1) ** 2


def ref_cka_biased(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return ref_hsic_biased(x, y) / math.sqrt(ref_hsic_biased(x, x) * ref_hsic_biased(y, y))


def ref_hsic_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. 2012 unbiased HSIC, written out literally with zero-diagonal kernels."""
    n = x.shape[0]
    k = x @ x.T
    l_ = y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l_, 0.0)
    ones = np.ones(n)
    term1 = np.trace(k @ l_)
    term2 = (ones @ k @ ones) * (ones @ l_ @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones @ k @ l_ @ ones)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def ref_cka_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return ref_hsic_unbiased(x, y) / math.sqrt(ref_hsic_unbiased(x, x) * ref_hsic_unbiased(y, y))


# --------------------------------------------------------------------------------------------
# Feature generators
# --------------------------------------------------------------------------------------------


def correlated(rng: np.random.Generator, n: int, d1: int, d2: int, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """x and y sharing a low-dimensional latent, with offsets so centring matters."""
    z = rng.standard_normal((n, 4))
    x = z @ rng.standard_normal((4, d1)) + noise * rng.standard_normal((n, d1)) + 3.0
    y = np.tanh(z @ rng.standard_normal((4, d2))) + noise * rng.standard_normal((n, d2)) - 1.5
    return x, y


def mlp_activations() -> tuple[np.ndarray, np.ndarray]:
    """Two hidden layers of a small random torch MLP on structured (sinusoidal) inputs."""
    torch.manual_seed(0)
    t = torch.linspace(0, 1, 300, dtype=torch.float32)[:, None]
    freqs = torch.arange(1, 9, dtype=torch.float32)[None, :]
    inputs = torch.cat([torch.sin(2 * math.pi * freqs * t), torch.cos(2 * math.pi * freqs * t)], dim=1)
    l1 = torch.nn.Linear(16, 64)
    l2 = torch.nn.Linear(64, 32)
    with torch.no_grad():
        h1 = torch.relu(l1(inputs))
        h2 = torch.relu(l2(h1))
    return h1.double().numpy(), h2.double().numpy()


def digits_features() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits pixels (1797 x 64) vs a random nonlinear (tanh) embedding of them."""
    datasets = pytest.importorskip("sklearn.datasets")
    pixels = datasets.load_digits().data[:600].astype(np.float64)
    rng = np.random.default_rng(1)
    embedded = np.tanh(pixels @ rng.standard_normal((64, 40)) / 30.0)
    return pixels, embedded


SHAPES = [(40, 200, 150), (300, 10, 25), (120, 120, 30), (16, 3, 500)]


# --------------------------------------------------------------------------------------------
# Agreement with the references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d1", "d2"), SHAPES)
@pytest.mark.parametrize("debiased", [False, True])
def test_matches_reference_random(n: int, d1: int, d2: int, debiased: bool) -> None:
    rng = np.random.default_rng(n + d1 + d2)
    x, y = correlated(rng, n, d1, d2)
    ref = ref_cka_unbiased(x, y) if debiased else ref_cka_biased(x, y)
    assert linear_cka(x, y, debiased=debiased) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("source", [mlp_activations, digits_features])
@pytest.mark.parametrize("debiased", [False, True])
def test_matches_reference_real_features(source, debiased: bool) -> None:  # type: ignore[no-untyped-def]
    x, y = source()
    ref = ref_cka_unbiased(x, y) if debiased else ref_cka_biased(x, y)
    value = linear_cka(x, y, debiased=debiased)
    assert value == pytest.approx(ref, abs=1e-6)
    assert 0.05 < value < 0.999  # related but not identical representations


def test_gram_and_feature_paths_agree() -> None:
    """Same data through both code paths: transposing the width regime via zero-padding columns."""
    rng = np.random.default_rng(3)
    x, y = correlated(rng, 50, 8, 6)
    narrow = linear_cka(x, y)  # n > d: feature form
    # Zero columns change nothing mathematically but push d above n: Gram form.
    wide = linear_cka(np.hstack([x, np.zeros((50, 300))]), np.hstack([y, np.zeros((50, 300))]))
    assert narrow == pytest.approx(wide, abs=1e-12)
    narrow_u = linear_cka(x, y, debiased=True)
    wide_u = linear_cka(np.hstack([x, np.zeros((50, 300))]), np.hstack([y, np.zeros((50, 300))]), debiased=True)
    assert narrow_u == pytest.approx(wide_u, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_identical_inputs_give_one(debiased: bool) -> None:
    rng = np.random.default_rng(4)
    x, _ = correlated(rng, 80, 30, 5)
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x + 7.0, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_orthogonal_and_scale_invariance_but_not_general_linear(debiased: bool) -> None:
    rng = np.random.default_rng(5)
    n, d = 200, 20
    x, y = correlated(rng, n, d, 12, noise=0.5)
    base = linear_cka(x, y, debiased=debiased)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    assert linear_cka(x @ q, y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x @ q, x, debiased=debiased) == pytest.approx(1.0, abs=1e-10)
    # A generic invertible but non-orthogonal map (anisotropic scaling mixed by rotations)
    # must change CKA: otherwise the invariance checks above would be vacuous.
    q2, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = q @ np.diag(np.logspace(-2, 1, d)) @ q2
    assert abs(np.linalg.det(a)) > 0
    assert abs(linear_cka(x @ a, y, debiased=debiased) - base) > 0.02
    assert linear_cka(x @ a, x, debiased=debiased) < 0.95


def test_debiased_removes_bias_for_independent_features() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((500, 100))
    y = rng.standard_normal((500, 100))
    biased = linear_cka(x, y)
    unbiased = linear_cka(x, y, debiased=True)
    assert biased > 0.1  # ~ sqrt(d1 d2) / (n + d) for independent isotropic features
    assert abs(unbiased) < 0.05


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_torch_and_numpy_agree(debiased: bool) -> None:
    rng = np.random.default_rng(7)
    x, y = correlated(rng, 64, 24, 10)
    expected = linear_cka(x, y, debiased=debiased)
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y), debiased=debiased) == pytest.approx(expected, abs=1e-12)
    assert linear_cka(torch.from_numpy(x), y, debiased=debiased) == pytest.approx(expected, abs=1e-12)
    assert linear_cka(x.tolist(), y, debiased=debiased) == pytest.approx(expected, abs=1e-12)
    xg = torch.from_numpy(x).requires_grad_(True)  # detached internally
    assert linear_cka(xg, y, debiased=debiased) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("debiased", [False, True])
def test_low_precision_tensors_accepted(dtype: torch.dtype, debiased: bool) -> None:
    rng = np.random.default_rng(8)
    x, y = correlated(rng, 64, 24, 10)
    xl = torch.from_numpy(x).to(dtype)
    yl = torch.from_numpy(y).to(dtype)
    value = linear_cka(xl, yl, debiased=debiased)
    assert isinstance(value, float)
    # Conversion to float64 is exact, so the result equals the float64 computation on the
    # rounded values; and it stays close to the full-precision value.
    assert value == pytest.approx(linear_cka(xl.double().numpy(), yl.double().numpy(), debiased=debiased), abs=1e-12)
    assert value == pytest.approx(linear_cka(x, y, debiased=debiased), abs=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_match_cpu() -> None:
    rng = np.random.default_rng(9)
    x, y = correlated(rng, 300, 48, 20)
    xc = torch.from_numpy(x).to("cuda", torch.bfloat16)
    yc = torch.from_numpy(y).to("cuda", torch.bfloat16)
    for debiased in (False, True):
        cpu = linear_cka(xc.cpu(), yc.cpu(), debiased=debiased)
        assert linear_cka(xc, yc, debiased=debiased) == pytest.approx(cpu, abs=1e-9)
        # Mixed devices: y is moved to x's device.
        assert linear_cka(xc, yc.cpu(), debiased=debiased) == pytest.approx(cpu, abs=1e-9)
        assert linear_cka(xc, yc.double().cpu().numpy(), debiased=debiased) == pytest.approx(cpu, abs=1e-9)
    acc = CKAAccumulator()
    acc.update(xc, yc)
    assert acc.compute() == pytest.approx(linear_cka(xc, yc, debiased=True), abs=1e-9)
    assert effective_rank(xc) == pytest.approx(effective_rank(xc.cpu()), rel=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
def test_constant_features_give_zero_not_nan(debiased: bool) -> None:
    rng = np.random.default_rng(10)
    y = rng.standard_normal((20, 5))
    for const in (np.zeros((20, 3)), np.full((20, 3), 0.1), np.full((20, 7), 1e6)):
        assert linear_cka(const, y, debiased=debiased) == 0.0
        assert linear_cka(y, const, debiased=debiased) == 0.0
        assert linear_cka(const, const, debiased=debiased) == 0.0
    assert linear_cka(torch.ones(20, 4, dtype=torch.bfloat16), y, debiased=debiased) == 0.0


def test_extreme_magnitudes_do_not_overflow() -> None:
    rng = np.random.default_rng(11)
    x, y = correlated(rng, 30, 6, 4)
    base = linear_cka(x, y, debiased=True)
    for scale in (1e-150, 1e150):
        value = linear_cka(x * scale, y, debiased=True)
        assert math.isfinite(value)
        assert value == pytest.approx(base, abs=1e-9)


def test_input_validation() -> None:
    rng = np.random.default_rng(12)
    x = rng.standard_normal((10, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(x, rng.standard_normal((11, 3)))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], x[:3], debiased=True)
    assert math.isfinite(linear_cka(x[:3], x[:3] ** 2))  # biased form is fine with n=3
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(x[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(x[None], x[None])
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(x[:1], x[:1])
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(bad, x)
    with pytest.raises(ValueError, match="empty"):
        linear_cka(np.zeros((10, 0)), x)


# --------------------------------------------------------------------------------------------
# Minibatch accumulator
# --------------------------------------------------------------------------------------------


def test_accumulator_single_batch_equals_unbiased() -> None:
    rng = np.random.default_rng(13)
    x, y = correlated(rng, 90, 30, 12)
    acc = CKAAccumulator()
    acc.update(torch.from_numpy(x).float(), y)
    expected = ref_cka_unbiased(torch.from_numpy(x).float().double().numpy(), y)
    assert acc.compute() == pytest.approx(expected, abs=1e-10)
    assert acc.n_batches == 1 and acc.n_examples == 90


def test_accumulator_matches_reference_sum_of_minibatch_hsic() -> None:
    rng = np.random.default_rng(14)
    x, y = correlated(rng, 96, 10, 40)
    acc = CKAAccumulator()
    kl = kk = ll = 0.0
    for start in range(0, 96, 24):
        xb, yb = x[start : start + 24], y[start : start + 24]
        acc.update(xb, yb)
        kl += ref_hsic_unbiased(xb, yb)
        kk += ref_hsic_unbiased(xb, xb)
        ll += ref_hsic_unbiased(yb, yb)
    assert acc.compute() == pytest.approx(kl / math.sqrt(kk * ll), abs=1e-9)


def test_accumulator_approximates_full_batch() -> None:
    rng = np.random.default_rng(15)
    x, y = correlated(rng, 1024, 32, 24)
    full = linear_cka(x, y, debiased=True)
    acc = CKAAccumulator()
    for start in range(0, 1024, 128):
        acc.update(x[start : start + 128], y[start : start + 128])
    assert acc.n_batches == 8 and acc.n_examples == 1024
    assert acc.compute() == pytest.approx(full, abs=0.05)
    # Whereas the biased estimator averaged over the same small batches is inflated for
    # independent features, the accumulator stays near zero.
    acc_ind = CKAAccumulator()
    xi = rng.standard_normal((1024, 64))
    yi = rng.standard_normal((1024, 64))
    biased_mean = np.mean([linear_cka(xi[s : s + 128], yi[s : s + 128]) for s in range(0, 1024, 128)])
    for s in range(0, 1024, 128):
        acc_ind.update(xi[s : s + 128], yi[s : s + 128])
    assert abs(acc_ind.compute()) < 0.05 < biased_mean


def test_accumulator_errors_and_degenerate_cases() -> None:
    rng = np.random.default_rng(16)
    acc = CKAAccumulator()
    with pytest.raises(ValueError, match="before any update"):
        acc.compute()
    with pytest.raises(ValueError, match="at least 4"):
        acc.update(rng.standard_normal((3, 5)), rng.standard_normal((3, 5)))
    with pytest.raises(ValueError, match="same number of rows"):
        acc.update(rng.standard_normal((8, 5)), rng.standard_normal((9, 5)))
    acc.update(np.full((8, 5), 0.1), rng.standard_normal((8, 2)))  # constant x
    assert acc.compute() == 0.0
    with pytest.raises(ValueError, match="widths changed"):
        acc.update(rng.standard_normal((8, 6)), rng.standard_normal((8, 2)))
    # A batch constant on both sides contributes nothing to a later informative one. (With only
    # x constant, y's HSIC_1(L,L) still counts towards the normaliser, as it should.)
    acc.reset()
    acc.update(np.full((8, 5), 0.1), np.full((8, 2), -3.0))
    assert acc.compute() == 0.0
    x, y = correlated(rng, 40, 5, 2)
    acc.update(x, y)
    assert acc.compute() == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-10)
    acc.reset()
    assert acc.n_batches == 0
    with pytest.raises(ValueError):
        acc.compute()


# --------------------------------------------------------------------------------------------
# Effective rank
# --------------------------------------------------------------------------------------------


def test_effective_rank_rank_one() -> None:
    rng = np.random.default_rng(17)
    u = rng.standard_normal((300, 1))
    v = rng.standard_normal((1, 12))
    assert effective_rank(u @ v + 5.0) == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_isotropic() -> None:
    rng = np.random.default_rng(18)
    x = rng.standard_normal((2000, 16))
    value = effective_rank(torch.from_numpy(x).float())
    assert 14.0 < value <= 16.0 + 1e-9


def test_effective_rank_tracks_collapse() -> None:
    rng = np.random.default_rng(19)
    n, d = 1000, 16
    z = rng.standard_normal((n, 2))
    mix = rng.standard_normal((2, d))
    noise = rng.standard_normal((n, d))
    ranks = [effective_rank(z @ mix + eps * noise) for eps in (3.0, 1.0, 0.3, 0.1, 0.0)]
    assert all(a > b for a, b in itertools.pairwise(ranks))
    assert ranks[0] > 12.0
    assert ranks[-1] <= 2.0 + 1e-9


def test_effective_rank_degenerate() -> None:
    assert effective_rank(np.zeros((10, 4))) == 0.0
    assert effective_rank(torch.full((10, 4), 3.3, dtype=torch.bfloat16)) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        effective_rank(np.ones((1, 4)))
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(np.ones(4))


@pytest.mark.parametrize(("n", "d1", "d2"), [(64, 8, 16), (24, 48, 96), (24, 8, 96)])
@pytest.mark.parametrize("debiased", [False, True])
def test_prepared_cka_equals_linear_cka_tall_and_wide(n: int, d1: int, d2: int, debiased: bool) -> None:
    """The probes' prepared form (feature space for tall features, the n x n Gram for wide
    ones, either when they are mixed) gives linear_cka's numbers."""
    from core.cka import prepare, prepared_cka

    g = torch.Generator().manual_seed(n + d1 + d2)
    x = torch.randn(n, d1, generator=g)
    y = x[:, :1].repeat(1, d2) * 0.5 + torch.randn(n, d2, generator=g)
    px, py = prepare(x), prepare(y)
    assert (px.gram is not None) == (n < d1) and (py.gram is not None) == (n < d2)
    assert prepared_cka(px, py, debiased) == pytest.approx(linear_cka(x, y, debiased), rel=1e-9, abs=1e-12)
    assert prepared_cka(px, px, debiased) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize(("n", "d"), [(200, 16), (40, 30), (30, 200)])
def test_effective_rank_equals_the_singular_value_definition(n: int, d: int) -> None:
    g = torch.Generator().manual_seed(n * d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(x - x.mean(dim=0)).square()
    p = s / s.sum()
    p = p[p > 0]
    assert effective_rank(x) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-9)
