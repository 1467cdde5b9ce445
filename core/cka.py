"""Linear CKA (centred kernel alignment) and effective rank of layer representations.

Conventions shared by every function here:

* Inputs are feature matrices of shape ``(n, d)``: **rows are examples** (clips, tokens),
  columns are features. ``x`` and ``y`` must have the same ``n`` with row ``i`` of both
  describing the same example; their widths ``d1``/``d2`` may differ.
* Inputs may be numpy arrays (or anything ``np.asarray`` accepts) or torch tensors of any
  dtype (bf16 included) on any device. Everything is converted to **float64** before a single
  product is accumulated: bf16/float32 Gram sums lose several digits otherwise. Numpy inputs
  are computed on the CPU; torch tensors stay on their device (a second input is moved to the
  device of the first torch input). Gradients are never tracked.
* Degenerate inputs never produce NaN/inf. A representation whose features are (numerically)
  constant over the examples has zero variance, and its similarity with anything is **defined
  as 0.0**. Non-finite inputs, non-2-D inputs and mismatched row counts raise ``ValueError``.

References:
    Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited" (biased CKA).
    Song et al. 2012, "Feature Selection via Dependence Maximization" (unbiased HSIC).
    Nguyen et al. 2021, "Do Wide and Deep Networks Learn the Same Things?" (minibatch CKA).
    Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["CKAAccumulator", "PreparedFeatures", "effective_rank", "linear_cka", "prepare", "prepared_cka"]

# A centred matrix whose Frobenius norm is below this fraction of the uncentred one is treated
# as constant: subtracting a float64 mean leaves rounding residue of order 1e-16 * |x| (times a
# small factor growing with n), far below this threshold, while real feature variation is far
# above it.
_CONSTANT_RTOL = 1e-10


def _as_float64(a: Any, name: str, device: torch.device | None = None, stack: bool = False) -> torch.Tensor:
    """Return ``a`` as a 2-D float64 torch tensor (detached), validating shape and finiteness;
    ``stack``: a 3-D stack of such matrices ``(L, n, d)`` is accepted too."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
        if device is not None and t.device != device:
            t = t.to(device)
        if t.device.type == "mps":
            # MPS has no float64 kernels; precision matters more than speed here.
            t = t.cpu()
        t = t.to(torch.float64)
    else:
        try:
            arr = np.asarray(a, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} cannot be converted to a float array: {exc}") from exc
        t = torch.from_numpy(arr)
        if device is not None:
            t = t.to(device)
    if t.ndim != 2 and not (stack and t.ndim == 3):
        raise ValueError(
            f"{name} must be a 2-D feature matrix (n_examples, n_features), got shape {tuple(t.shape)}; "
            "reshape a 1-D vector to (n, 1) explicitly"
        )
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    # A NaN or inf reaches the sum (one pass, no mask); a finite sum that overflowed is then
    # checked element by element.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _pair(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert both inputs to float64 on a common device and check that their rows match."""
    device: torch.device | None = None
    for a in (x, y):
        if isinstance(a, torch.Tensor):
            device = a.device
            break
    xt = _as_float64(x, "x", device)
    yt = _as_float64(y, "y", xt.device)
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(f"x and y must have the same number of rows (examples): got {xt.shape[0]} and {yt.shape[0]}")
    return xt, yt


def _centre(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre the columns of ``t`` (``(n, d)``, or a stack ``(L, n, d)``); return the centred
    matrix and its Frobenius norm (a float64 tensor, one per matrix).

    The norm is 0.0 when the features are numerically constant over the rows (see
    ``_CONSTANT_RTOL``), so callers can apply the "constant -> similarity 0" convention.
    """
    c = t - t.mean(dim=-2, keepdim=True)
    norm = torch.linalg.matrix_norm(c)
    return c, torch.where(norm <= _CONSTANT_RTOL * torch.linalg.matrix_norm(t), 0.0, norm)


def _centred_rows(x: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as float64 ``(n, d)``, or a stack ``(L, n, d)`` of matrices of one shape, with at
    least 2 rows (``what`` names the caller in the error), column-centred and scaled to unit
    Frobenius norm (:func:`_centre`); with a bool per matrix (shape ``()`` or ``(L,)``):
    numerically constant, whose rows come back as exact zeros."""
    t = _as_float64(x, "x", stack=True)
    if t.shape[-2] < 2:
        raise ValueError(f"{what} needs at least 2 examples (rows), got n={t.shape[-2]}")
    c, norm = _centre(t)
    constant = norm == 0.0
    return c * torch.where(constant, 0.0, 1.0 / torch.where(constant, 1.0, norm))[..., None, None], constant


def _use_gram(n: int, d1: int, d2: int) -> bool:
    """Whether the n x n Gram form is cheaper than the feature-space (d x d) form.

    Gram form costs ~n^2 (d1 + d2) multiply-adds (forming K and L); the feature form costs
    ~n (d1 d2 + d1^2 + d2^2) (forming Y^T X, X^T X, Y^T Y). Both give the same traces.
    """
    return n * (d1 + d2) < d1 * d2 + d1 * d1 + d2 * d2


def _trace_products(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Return tr(KL), tr(KK), tr(LL) for K = a a^T, L = b b^T (no centring done here).

    tr(KL) = ||b^T a||_F^2, so the n x n matrices are only formed when that is cheaper.
    """
    n, d1 = a.shape
    d2 = b.shape[1]
    if _use_gram(n, d1, d2):
        k = a @ a.T
        l_ = b @ b.T
        # K and L are symmetric, so tr(KL) = sum_ij K_ij L_ij.
        return float((k * l_).sum()), float(k.square().sum()), float(l_.square().sum())
    return (
        float((b.T @ a).square().sum()),
        float((a.T @ a).square().sum()),
        float((b.T @ b).square().sum()),
    )


def _unbiased_hsic_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Unbiased HSIC_1(K,L), HSIC_1(K,K), HSIC_1(L,L) for linear kernels K = a a^T, L = b b^T.

    Song et al. 2012 with K~, L~ the kernels with zeroed diagonals:

        HSIC_1 = [tr(K~L~) + (1'K~1)(1'L~1)/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))

    Every term is expressed through rows of ``a``/``b`` so that no n x n matrix is needed
    unless it is the cheaper route for tr(KL):
        tr(K~L~) = tr(KL) - sum_i K_ii L_ii,   K~1 = a (a^T 1) - diag(K),
        1'K~L~1  = (K~1) . (L~1).
    The estimator is invariant to shifting the features, so callers may centre ``a``/``b``
    first (they do: it reduces cancellation in the subtractions above).
    """
    n = a.shape[0]
    kl, kk, ll = _trace_products(a, b)
    dk = a.square().sum(dim=1)  # diag(K): squared row norms
    dl = b.square().sum(dim=1)
    k1 = a @ a.sum(dim=0) - dk  # K~ 1
    l1 = b @ b.sum(dim=0) - dl
    sk, sl = float(k1.sum()), float(l1.sum())
    return (
        float(_hsic(n, kl, float(dk @ dl), sk, sl, k1, l1)),
        float(_hsic(n, kk, float(dk @ dk), sk, sk, k1, k1)),
        float(_hsic(n, ll, float(dl @ dl), sl, sl, l1, l1)),
    )


@dataclass(frozen=True)
class PreparedFeatures:
    """One representation, or a stack of representations of one shape, made ready for linear
    CKA against several others (:func:`prepare`). Shapes: ``(n, d)`` for one, with a leading
    ``(L,)`` for a stack (the blocks of a probe that share a shape), so that one call covers them.

    ``rows``: column-centred float64 features scaled to unit Frobenius norm (zeros when
    ``constant``); ``trace``: tr(KK) = ||rows^T rows||_F^2; ``diag``: K_ii; ``ones``: K~1 (zeroed
    diagonal); ``total``: 1'K~1; ``hsic``: the unbiased HSIC_1(K, K) (NaN below 4 rows). A probe
    compares every block with the previous probe and with step 0: prepared once, these terms are
    not recomputed per comparison.
    """

    rows: torch.Tensor
    constant: torch.Tensor
    trace: torch.Tensor
    diag: torch.Tensor
    ones: torch.Tensor
    total: torch.Tensor
    hsic: torch.Tensor
    gram: torch.Tensor | None = None  # K = rows rows^T when there are fewer rows than dims


def _hsic(n: int, tr_full: Any, diag_dot: Any, s1: Any, s2: Any, v1: torch.Tensor, v2: torch.Tensor) -> Any:
    """Unbiased HSIC_1 from its parts (see :func:`_unbiased_hsic_terms`); floats, or tensors
    over a stack's leading dims (``v1``, ``v2``: ``(..., n)``)."""
    tr_tilde = tr_full - diag_dot
    return (tr_tilde + s1 * s2 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (v1 * v2).sum(-1)) / (n * (n - 3))


def prepare(x: Any) -> PreparedFeatures:
    """Centre, scale and precompute ``x (n, d)`` once for :func:`prepared_cka`; or a stack
    ``(L, n, d)`` of L representations of the same examples and width, prepared in one pass.

    Same conversions and checks as :func:`linear_cka`; the result gives the same numbers as
    ``linear_cka`` (up to float64 rounding) wherever that uses the feature-space form
    (n (d1 + d2) >= d1 d2 + d1^2 + d2^2, e.g. the probes' 1024 rows x 128 dims).
    """
    a, constant = _centred_rows(x, "CKA")
    n = a.shape[-2]
    # ||a^T a||_F^2 = ||a a^T||_F^2: the smaller Gram. Wide features keep K (n x n), so that a
    # comparison of two of them costs n^2 instead of n d1 d2 (the video ResNet's 512-channel stage).
    gram = a @ a.mT if n < a.shape[-1] else None
    trace = (gram if gram is not None else a.mT @ a).square().sum((-2, -1))
    diag = a.square().sum(-1)
    ones = (a @ a.sum(-2).unsqueeze(-1)).squeeze(-1) - diag
    total = ones.sum(-1)
    hsic = (
        _hsic(n, trace, (diag * diag).sum(-1), total, total, ones, ones) if n >= 4 else torch.full_like(total, math.nan)
    )
    return PreparedFeatures(a, constant, trace, diag, ones, total, hsic, gram)


def prepared_cka(x: PreparedFeatures, y: PreparedFeatures, debiased: bool = False) -> torch.Tensor:
    """:func:`linear_cka` of two prepared representations of the same rows (feature-space form):
    a float64 tensor of shape ``()``, or ``(L,)`` for two stacks of L (representation i of ``x``
    against representation i of ``y``). 0.0 where either is constant or a denominator is not
    positive, as :func:`linear_cka`."""
    n = x.rows.shape[-2]
    if y.rows.shape[:-1] != x.rows.shape[:-1]:
        raise ValueError(
            f"x and y must have the same number of rows (examples): got {n} and {y.rows.shape[-2]}"
            if y.rows.shape[-2] != n
            else f"x and y must be stacks of the same length: got {tuple(x.rows.shape[:-2])} and "
            f"{tuple(y.rows.shape[:-2])}"
        )
    if debiased and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples (rows), got n={n}")
    a = x.rows
    other = lambda t: t.to(a.device)
    if x.gram is not None and y.gram is not None:
        kl = (x.gram * other(y.gram)).sum((-2, -1))  # <K, L> = ||b^T a||_F^2
    else:
        kl = (other(y.rows).mT @ a).square().sum((-2, -1))
    if debiased:
        cross = _hsic(n, kl, (x.diag * other(y.diag)).sum(-1), x.total, other(y.total), x.ones, other(y.ones))
        value = _normalised_ratio(cross, x.hsic, other(y.hsic))
    else:
        value = _normalised_ratio(kl, x.trace, other(y.trace))
    return torch.where(x.constant | other(y.constant), 0.0, value)


def _normalised_ratio(kl: Any, kk: Any, ll: Any) -> torch.Tensor:
    """kl / sqrt(kk * ll) elementwise (floats or float64 tensors), defined as 0.0 where the
    denominator is not positive or not finite."""
    kl, kk, ll = (torch.as_tensor(v, dtype=torch.float64) for v in (kl, kk, ll))
    denom_sq = kk * ll
    ok = (kk > 0.0) & (ll > 0.0) & torch.isfinite(denom_sq) & (denom_sq > 0.0)
    value = kl / torch.where(ok, denom_sq, 1.0).sqrt()
    return torch.where(ok & torch.isfinite(value), value, 0.0)


def linear_cka(x: Any, y: Any, debiased: bool = False) -> float:
    """Linear CKA between two representations of the same ``n`` examples.

    Args:
        x: features ``(n, d1)``; rows are examples. numpy array or torch tensor, any dtype.
        y: features ``(n, d2)`` of the same examples in the same row order.
        debiased: ``False`` (default) gives the biased estimator of Kornblith et al. 2019,
            ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred features; it is
            exactly 1.0 for identical inputs but biased upwards for finite ``n`` (independent
            features give a clearly positive value when ``d`` is not << ``n``). ``True`` gives
            the unbiased-HSIC estimator (Song et al. 2012, Nguyen et al. 2021), ~0 for
            independent features; it needs ``n >= 4`` and may be slightly negative.

    Returns:
        CKA as a Python float. 0.0 if either input has (numerically) constant features: the
        similarity with a constant representation is defined as 0. The debiased value is not
        clipped, but it is never NaN/inf (a non-positive denominator gives 0.0).

    Raises:
        ValueError: non-2-D input, mismatched row counts, NaN/inf entries, ``n < 2``
            (biased) or ``n < 4`` (debiased).
    """
    xt, yt = _pair(x, y)
    n = xt.shape[0]
    if debiased and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples (rows), got n={n}")
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples (rows), got n={n}")
    if not _use_gram(n, xt.shape[1], yt.shape[1]):  # the feature-space form: one code path with prepare()
        return float(prepared_cka(prepare(xt), prepare(yt), debiased))
    xc, x_norm = _centre(xt)
    yc, y_norm = _centre(yt)
    if x_norm == 0.0 or y_norm == 0.0:
        return 0.0
    # CKA is invariant to isotropic scaling; dividing by the Frobenius norms keeps the fourth
    # powers in the traces O(1), so huge or tiny activations cannot overflow/underflow.
    xc = xc / x_norm
    yc = yc / y_norm
    if debiased:
        kl, kk, ll = _unbiased_hsic_terms(xc, yc)
    else:
        # On centred features tr(K H L H) = tr(KL); the 1/(n-1)^2 HSIC factors cancel.
        kl, kk, ll = _trace_products(xc, yc)
    return float(_normalised_ratio(kl, kk, ll))


class CKAAccumulator:
    """Minibatch linear CKA (Nguyen et al. 2021).

    Each :meth:`update` receives one minibatch ``(n_b, d1)``, ``(n_b, d2)`` of matching rows and
    adds its unbiased HSIC_1(K,L), HSIC_1(K,K), HSIC_1(L,L); :meth:`compute` returns
    ``sum_KL / sqrt(sum_KK * sum_LL)``. Because each minibatch estimate is unbiased, the result
    does not depend on the batch size the way the biased estimator does, and memory stays
    O(n_b * d) however many examples are streamed. With one batch it equals
    ``linear_cka(x, y, debiased=True)``.

    The feature widths must stay the same across updates (a changed width means different
    layers were mixed up). Minibatches whose features are constant contribute nothing.
    """

    def __init__(self) -> None:
        self._sum_kl = 0.0
        self._sum_kk = 0.0
        self._sum_ll = 0.0
        self._n_batches = 0
        self._n_examples = 0
        self._dims: tuple[int, int] | None = None
        # Fixed per-side scales (set from the first non-constant batch). Scaling every batch of
        # x by the same a and of y by the same b multiplies the sums by a^2 b^2, a^4, b^4, which
        # cancels in compute(), while keeping the fourth powers O(1) for extreme magnitudes.
        self._x_scale: float | None = None
        self._y_scale: float | None = None

    @property
    def n_batches(self) -> int:
        """Number of minibatches accumulated so far."""
        return self._n_batches

    @property
    def n_examples(self) -> int:
        """Total number of rows (examples) accumulated so far."""
        return self._n_examples

    def update(self, x: Any, y: Any) -> None:
        """Add one minibatch: ``x`` ``(n_b, d1)``, ``y`` ``(n_b, d2)``, rows = the same examples.

        Raises:
            ValueError: ``n_b < 4``, mismatched rows, non-2-D/non-finite input, or feature
                widths that differ from the first update.
        """
        xt, yt = _pair(x, y)
        n = xt.shape[0]
        if n < 4:
            raise ValueError(f"each CKA minibatch needs at least 4 examples (rows), got n_b={n}")
        dims = (xt.shape[1], yt.shape[1])
        if self._dims is None:
            self._dims = dims
        elif dims != self._dims:
            raise ValueError(f"feature widths changed between updates: first {self._dims}, now {dims}")
        # Centring per batch is exact here: the unbiased HSIC is shift-invariant.
        xc, x_norm = _centre(xt)
        yc, y_norm = _centre(yt)
        if x_norm == 0.0:
            xc = torch.zeros_like(xc)  # drop rounding residue: constant batch contributes 0
        elif self._x_scale is None:
            self._x_scale = x_norm / math.sqrt(n)
        if y_norm == 0.0:
            yc = torch.zeros_like(yc)
        elif self._y_scale is None:
            self._y_scale = y_norm / math.sqrt(n)
        if self._x_scale is not None:
            xc = xc / self._x_scale
        if self._y_scale is not None:
            yc = yc / self._y_scale
        kl, kk, ll = _unbiased_hsic_terms(xc, yc)
        self._sum_kl += kl
        self._sum_kk += kk
        self._sum_ll += ll
        self._n_batches += 1
        self._n_examples += n

    def compute(self) -> float:
        """Minibatch CKA of everything accumulated; 0.0 if either side was constant throughout.

        Raises:
            ValueError: no minibatch was added yet.
        """
        if self._n_batches == 0:
            raise ValueError("CKAAccumulator.compute() called before any update()")
        return float(_normalised_ratio(self._sum_kl, self._sum_kk, self._sum_ll))

    def reset(self) -> None:
        """Forget all accumulated minibatches (the feature widths may change afterwards)."""
        self._sum_kl = self._sum_kk = self._sum_ll = 0.0
        self._n_batches = self._n_examples = 0
        self._dims = None
        self._x_scale = self._y_scale = None


def effective_rank(x: Any) -> Any:
    """Entropy effective rank (Roy & Vetterli 2007) of the feature covariance of ``x``.

    ``x`` is ``(n, d)`` with rows = examples: a float. A stack ``(L, n, d)`` of matrices of one
    shape gives the L ranks in one pass, as a float64 tensor ``(L,)``. With ``s_i`` the singular
    values of the column-centred features, ``p_i = s_i^2 / sum_j s_j^2`` are the normalised
    covariance eigenvalues and the result is ``exp(-sum_i p_i log p_i)``, in
    ``[1, min(n - 1, d)]``: 1.0 for rank-1 data, close to ``d`` for isotropic features with
    ``n >> d``. It drops as features collapse onto fewer directions.

    For (numerically) constant features the covariance is zero and the effective rank is
    **defined as 0.0** (no direction carries variance), never NaN.

    Raises:
        ValueError: non-2-D (or 3-D stack) or non-finite input, or ``n < 2``.
    """
    c, constant = _centred_rows(x, "effective_rank")  # normalised: the squared singular values sum to 1
    n = c.shape[-2]
    # The nonzero eigenvalues of the smaller Gram (d x d c^T c, or n x n c c^T) are the squared
    # singular values, at a fraction of an SVD's cost (differences ~1e-12 here).
    p = torch.linalg.eigvalsh(c.mT @ c if n >= c.shape[-1] else c @ c.mT).clamp_min(0.0)
    p = p / torch.where(constant, 1.0, p.sum(-1))[..., None]
    entropy = -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0
    ranks = torch.where(constant, 0.0, entropy.exp())
    return float(ranks) if ranks.ndim == 0 else ranks
