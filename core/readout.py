"""Downstream readouts on a frozen encoder: attentive, linear and dense (depth) probes.

The paper evaluates representations with cross-attention ("attentive") readouts on frozen
features; we do the same at toy scale. The encoder runs once per split (:func:`extract_features`,
eval mode, no_grad, unmasked clips) and its token features are cached on the CPU, so fitting a
probe (:func:`fit_probe`) only trains a small head on ``(n, N, D)`` tensors -- a few seconds.
Features are PCA-whitened with train statistics before every probe (:func:`whitening`), so an
encoder is judged on the information in its features, not on how it scales their directions.

Pure torch, no MLflow: ``experiments/evaluate.py`` loads runs and logs the metrics.

Conventions:

- Token order is the model's (t, h, w) grid order (``core.model.VideoMAE.patchify``), so dense
  targets pooled with :func:`pool_dense_targets` line up with the tokens.
- Layer keys of cached features: ``"final"`` = the encoder output after its final LayerNorm;
  an ``int`` i = the raw output of ``model.blocks[i]`` (0-based).
- Metric keys of :func:`evaluate_encoder` follow docs/architecture.md, "Run schema": ``eval/<task>/<metric>``
  and ``eval/<task>/block_03/<metric>``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core.config import ExperimentConfig, Geometry, config_from_dict
from core.data import ClipDataset, Task, build_dataset, get_batch
from core.errors import LayerLockError
from core.freezing import freeze_all

ProbeKind = Literal["attentive", "linear", "dense"]
LayerKey = str | int  # "final" or a 0-based block index
MIN_DEPTH = 1e-3  # predictions are clamped to this before relative depth metrics


# ----------------------------------------------------------------------------- probe heads


class AttentiveProbe(nn.Module):
    """Cross-attention readout: learned queries attend over frozen tokens, then a linear head.

    ``tokens (B, N, dim)`` -> ``logits (B, n_out)``. Tokens are layer-normalised (features of
    different blocks have very different scales) and projected to keys; each of the
    ``heads * n_queries`` learned queries pools the normalised tokens with its own softmax
    attention; the pooled vectors are concatenated, normalised and mapped to the outputs by one
    linear layer. Several pooled vectors let the head compare what it gathered from different
    places (the digit early and late in the clip, for its direction).

    Relation to ``nn.MultiheadAttention`` with a learned query: the value and output projections
    are linear and fold into the linear head, so they are left out and every query attends
    with a full-width head (cheaper). Hence ``heads`` and ``n_queries`` play the
    same role here and only their product (the number of pooled vectors) matters; both are kept
    so the constructor reads like an attention layer. The key projection would fold into the
    queries too, but it is kept: the product ``q . (W_k x)`` trains much faster than a bare query
    (on raw random-init features, direction accuracy 0.80 -> 0.92 at the same budget).
    """

    def __init__(self, *, dim: int, n_out: int, heads: int = 4, n_queries: int = 4) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.key = nn.Linear(dim, dim)
        nn.init.eye_(self.key.weight)  # start as plain dot-product attention over the tokens
        nn.init.zeros_(self.key.bias)
        # (heads, n_queries, dim); unit-variance entries make the initial attention logits O(1)
        # after the 1/sqrt(dim) scale, neither uniform nor one-hot.
        self.query = nn.Parameter(torch.randn(heads, n_queries, dim))
        self.out_norm = nn.LayerNorm(heads * n_queries * dim)
        self.head = nn.Linear(heads * n_queries * dim, n_out)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, N, D)`` -> pooled ``(B, heads * n_queries * D)``.

        Softmax attention of every query over the N tokens, as two matmuls (faster on CPU than
        ``F.scaled_dot_product_attention`` with the tokens expanded per head).
        """
        x = self.token_norm(tokens)  # (B, N, D): values
        q = self.query.flatten(0, 1)  # (H*Q, D)
        logits = self.key(x) @ q.T * x.shape[-1] ** -0.5  # (B, N, H*Q)
        weights = logits.softmax(dim=1)  # sums to 1 over the N tokens
        return (weights.transpose(1, 2) @ x).flatten(1)  # (B, H*Q*D)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.out_norm(self.pool(tokens)))  # (B, n_out)


class LinearProbe(nn.Module):
    """Mean-pooled tokens -> LayerNorm without affine (standardises features) -> Linear.

    ``tokens (B, N, dim)`` -> ``logits (B, n_out)``.
    """

    def __init__(self, *, dim: int, n_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.head = nn.Linear(dim, n_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(tokens.mean(dim=1)))


class DenseProbe(nn.Module):
    """Per-token linear head: ``tokens (B, N, dim)`` -> one value per token ``(B, N)``.

    Used for depth: each token predicts the mean depth of its tubelet's pixels
    (see :func:`pool_dense_targets`). No per-token LayerNorm: it would divide out each token's
    feature scale, and a target linear in the features would no longer be linear in the
    normalised ones; :func:`fit_probe` whitens the features with dataset statistics instead.
    """

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens).squeeze(-1)


def pool_dense_targets(maps: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Per-pixel maps ``(B, T, H, W)`` -> per-token means ``(B, N)`` in the model's token order.

    Averages over each tubelet (``tubelet`` frames x ``patch`` x ``patch`` pixels), the same cells
    the patch embedding sees; flattening the (t, h, w) grid matches ``VideoMAE.patchify``.
    """
    g = geometry
    pooled = F.avg_pool3d(maps.unsqueeze(1).float(), kernel_size=(g.tubelet, g.patch, g.patch))
    return pooled.flatten(1)  # (B, t*h*w)


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """AbsRel = mean(|pred - gt| / gt); delta1 = fraction with max(pred/gt, gt/pred) < 1.25.

    ``pred`` is clamped to ``MIN_DEPTH`` first so the ratios are defined.
    """
    pred = pred.clamp_min(MIN_DEPTH)
    ratio = torch.maximum(pred / gt, gt / pred)
    return {"absrel": float(((pred - gt).abs() / gt).mean()), "delta1": float((ratio < 1.25).float().mean())}


def build_probe(
    kind: ProbeKind, *, dim: int, n_classes: int | None = None, heads: int = 4, n_queries: int = 4
) -> nn.Module:
    if kind == "dense":
        return DenseProbe(dim=dim)
    if n_classes is None:
        raise ValueError(f"a {kind} probe needs n_classes")
    if kind == "attentive":
        return AttentiveProbe(dim=dim, n_out=n_classes, heads=heads, n_queries=n_queries)
    if kind == "linear":
        return LinearProbe(dim=dim, n_out=n_classes)
    raise ValueError(f"unknown probe kind {kind!r}")


# ----------------------------------------------------------------------------- features


def _layer_keys(block: None | int | str, depth: int) -> list[LayerKey]:
    if block is None:
        return ["final"]
    if block == "all":
        return list(range(depth))
    if isinstance(block, int) and not isinstance(block, bool):
        if not -depth <= block < depth:
            raise LayerLockError(f"block {block} out of range for an encoder of depth {depth}")
        return [block % depth]
    raise LayerLockError(f"block must be None, an int or 'all', got {block!r}")


def extract_features(
    model: nn.Module,
    videos: torch.Tensor | Iterable[torch.Tensor],
    *,
    block: None | int | str = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    total: int | None = None,
) -> dict[LayerKey, torch.Tensor]:
    """Run the frozen encoder once over clips and cache token features on the CPU (float32).

    ``videos``: one tensor ``(n, 3, T, H, W)`` (split into ``batch_size`` chunks) or an iterable of
    ``(B, 3, T, H, W)`` batches. ``block``: None -> ``{"final": ...}`` (output after the final
    norm); int i -> ``{i: ...}`` (raw output of ``model.blocks[i]``); "all" -> ``{0: ..., ...,
    depth-1: ...}`` (every block). Each value is ``(n, N, D)``. The model runs in eval mode on
    unmasked clips under no_grad and is put back in its previous mode afterwards. ``total``:
    number of batches for the progress bar when ``videos`` is a generator.
    """
    return _extract(
        model,
        videos,
        _layer_keys(block, len(model.blocks)),
        device=device,
        batch_size=batch_size,
        progress=progress,
        total=total,
    )


@torch.no_grad()
def _extract(
    model: nn.Module,
    videos: torch.Tensor | Iterable[torch.Tensor],
    keys: Sequence[LayerKey],
    *,
    device: torch.device | str | None,
    batch_size: int,
    progress: bool,
    total: int | None,
) -> dict[LayerKey, torch.Tensor]:
    if isinstance(videos, torch.Tensor):
        total = math.ceil(len(videos) / batch_size)
        videos = videos.split(batch_size)
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[LayerKey, list[torch.Tensor]] = {k: [] for k in keys}
    try:
        for video in tqdm(videos, total=total, desc="features", unit="batch", leave=False, disable=not progress):
            final, blocks = model.forward_encoder(video.to(device), None, return_blocks=True)
            for k in keys:
                feats = final if k == "final" else blocks[k]
                out[k].append(feats.float().cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- fitting


def whitening(feats: torch.Tensor, shrink: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA-whitening fitted on ``feats (n, N, D)`` (all tokens pooled): returns ``mean (D,)`` and
    ``W (D, D)`` such that ``(x - mean) @ W`` has (nearly) identity covariance.

    Why: features of trained encoders are very anisotropic (a 300-step MAE puts most of its
    token variance in ~3 directions), and a small probe trained for a few seconds mostly reads
    the large directions. Whitening makes the readout judge an encoder up to an invertible
    linear map of its features -- information, not scale. ``shrink`` adds ``shrink * mean
    eigenvalue`` to every eigenvalue (ridge-style) so near-empty directions are not blown up
    into noise. Computed in float64 for a stable eigendecomposition.
    """
    x = feats.reshape(-1, feats.shape[-1]).double()
    mean = x.mean(0)
    cov = torch.cov((x - mean).T)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(0) + shrink * evals.clamp_min(0).mean() + 1e-12
    return mean.float(), (evecs / evals.sqrt()).float()


@dataclass(frozen=True)
class ProbeSettings:
    """Hyper-parameters of one probe fit.

    Defaults sized for a CPU (an attentive fit on 1024 clips x 64 tokens x 96 dims in seconds).
    Chosen on a split *inside* the train split of moving_digits (fit on 768 clips, score
    on 256 others), never on the val split: ``lr`` 1e-2 instead of 2e-3 (the probe underfit,
    train accuracy 0.3), 16 pooled vectors instead of 4 (+0.1 digit accuracy), whitening
    shrinkage 0.1 (0.01 and 1.0 were worse).
    """

    epochs: int = 40
    lr: float = 1e-2
    weight_decay: float = 0.05
    batch_size: int = 64
    heads: int = 4
    n_queries: int = 4
    whiten: float | None = 0.1


@contextlib.contextmanager
def _threads(n: int | None):
    """Temporarily run torch on ``n`` intra-op threads (None: leave as is)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _eval_batches(module: nn.Module, feats: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([module(chunk) for chunk in feats.split(batch_size)])


def fit_probe(
    kind: ProbeKind,
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    n_classes: int | None = None,
    settings: ProbeSettings = ProbeSettings(),
    seed: int = 0,
    threads: int | None = 1,
) -> dict[str, float]:
    """Train one probe on cached features and return its validation metrics.

    Features are ``(n, N, D)``. ``kind`` "attentive" / "linear": labels ``(n,)`` int64, returns
    ``{"acc"}``; "dense": labels ``(n, N)`` per-token targets (depth), returns ``{"absrel",
    "delta1"}``. AdamW with a cosine-decayed learning rate; the initialisation and minibatch
    order come from ``seed`` only (the global RNG is left untouched), so a fit is reproducible.

    ``settings`` (:class:`ProbeSettings`) holds the hyper-parameters. ``settings.whiten``:
    PCA-whiten the features with statistics of the *train* features, with that shrinkage (see
    :func:`whitening`); None leaves them as they are.

    ``threads``: intra-op threads while fitting (default 1). A probe's ops are tiny, so threads
    cost more in synchronisation than they save, and a fixed count keeps results independent of
    the machine.
    """
    with _threads(threads):
        if settings.whiten is not None:
            mean, w = whitening(train_feats, settings.whiten)
            train_feats, val_feats = (train_feats - mean) @ w, (val_feats - mean) @ w
        return _fit(
            kind, train_feats, train_labels, val_feats, val_labels, n_classes=n_classes, settings=settings, seed=seed
        )


def _fit(
    kind: ProbeKind,
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    n_classes: int | None,
    settings: ProbeSettings,
    seed: int,
) -> dict[str, float]:
    epochs, batch_size = settings.epochs, settings.batch_size
    if len(train_feats) != len(train_labels) or len(val_feats) != len(val_labels):
        raise ValueError("features and labels differ in length")
    dim = train_feats.shape[-1]
    if kind != "dense" and n_classes is None:
        n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = build_probe(kind, dim=dim, n_classes=n_classes, heads=settings.heads, n_queries=settings.n_queries)
    if isinstance(probe, DenseProbe):
        # Start at the mean target: the bias would otherwise spend most of the budget getting
        # from 0 to the depth range, and the whitened features have zero mean anyway.
        nn.init.constant_(probe.head.bias, float(train_labels.float().mean()))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    n = len(train_feats)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    train_labels = train_labels.float() if kind == "dense" else train_labels.long()

    probe.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for idx in order.split(batch_size):
            out = probe(train_feats[idx])
            if kind == "dense":
                # L1 on depth: the metric (AbsRel) is a relative L1, and L1 is robust to the
                # many background tokens dominating a squared loss.
                loss = F.l1_loss(out, train_labels[idx])
            else:
                loss = F.cross_entropy(out, train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    probe.eval()
    with torch.no_grad():
        pred = _eval_batches(probe, val_feats)
    if kind == "dense":
        return depth_metrics(pred, val_labels.float())
    return {"acc": float((pred.argmax(-1) == val_labels).float().mean())}


# ----------------------------------------------------------------------------- evaluation data


@dataclass
class EvalData:
    """Probe clips of one dataset: ``train`` clips fit the probes, ``val`` clips score them.

    ``*_video``: ``(n, 3, T, H, W)``; ``*_labels[task]``: ``(n,)`` int64 for class tasks,
    ``(n, N)`` per-token targets for dense tasks (already pooled to the token grid).
    Built once and reusable across encoders (an MAE run, a LayerLock run, a random init), so
    every encoder is scored on exactly the same clips.
    """

    tasks: dict[str, Task]
    geometry: Geometry
    train_video: torch.Tensor
    train_labels: dict[str, torch.Tensor]
    val_video: torch.Tensor
    val_labels: dict[str, torch.Tensor]
    info: dict[str, float] = field(default_factory=dict)

    def chance(self, task: str) -> dict[str, float]:
        """Chance-level metrics of a task on the val clips.

        Class tasks: ``1 / n_classes``. Dense tasks: the metrics of the best constant predictor
        (the median of the train targets), i.e. what a probe gets without using the features.
        """
        t = self.tasks[task]
        if t.kind == "class":
            return {"acc": 1.0 / t.n_classes}
        const = self.train_labels[task].median()
        return depth_metrics(torch.full_like(self.val_labels[task], float(const)), self.val_labels[task])


def default_clips(cfg: ExperimentConfig) -> tuple[int, int]:
    """Probe clip counts: 1024 train / 512 val, fewer when the dataset is smaller.

    Val clips cost only a forward pass, and 512 of them halve the accuracy's sampling variance
    compared with 256 (standard error about 0.02 instead of 0.03 at 50% accuracy).
    """
    return min(1024, cfg.data.train_clips), min(512, cfg.data.val_clips)


def _collect(
    ds: ClipDataset, n: int, tasks: dict[str, Task], geometry: Geometry, progress: bool, desc: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    videos: list[torch.Tensor] = []
    labels: dict[str, list[torch.Tensor]] = {k: [] for k in tasks}
    for start in tqdm(range(0, n, 128), desc=desc, unit="batch", leave=False, disable=not progress):
        video, lab = get_batch(ds, range(start, min(start + 128, n)))
        videos.append(video)
        for k, task in tasks.items():
            y = lab[k]
            labels[k].append(pool_dense_targets(y, geometry) if task.kind == "dense" else y)
    return torch.cat(videos), {k: torch.cat(v) for k, v in labels.items()}


def load_eval_data(
    cfg: ExperimentConfig,
    tasks: Sequence[str] | None = None,
    *,
    train_clips: int | None = None,
    val_clips: int | None = None,
    progress: bool = True,
) -> EvalData:
    """Draw the probe clips of ``cfg.data``: the first ``train_clips`` items of the "train" split
    and the first ``val_clips`` of the "val" split.

    The procedural datasets seed item i by ``(data.seed, split, i)``, so "the first n items" is a
    fixed random subset; their val split uses held-out source images, never seen by a probe in
    training. ``tasks`` restricts the tasks (default: all of the dataset's); an unknown name
    raises LayerLockError listing the valid ones.
    """
    t0 = time.perf_counter()
    train_ds, val_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    chosen = select_tasks(train_ds.tasks, tasks)
    d_train, d_val = default_clips(cfg)
    n_train = min(train_clips or d_train, len(train_ds))
    n_val = min(val_clips or d_val, len(val_ds))
    if n_train < 1 or n_val < 1:
        raise LayerLockError(f"need at least one train and one val clip (have {n_train} / {n_val})")
    g = cfg.geometry
    tv, tl = _collect(train_ds, n_train, chosen, g, progress, "probe train clips")
    vv, vl = _collect(val_ds, n_val, chosen, g, progress, "probe val clips")
    return EvalData(
        tasks=chosen,
        geometry=g,
        train_video=tv,
        train_labels=tl,
        val_video=vv,
        val_labels=vl,
        info={"data_s": time.perf_counter() - t0},
    )


def select_tasks(available: dict[str, Task], names: Sequence[str] | None) -> dict[str, Task]:
    """The tasks named (in the order given), or all; unknown names raise LayerLockError."""
    if not names:
        return dict(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise LayerLockError(
            f"unknown task {', '.join(repr(n) for n in unknown)}; this dataset has: {', '.join(available)}"
        )
    return {n: available[n] for n in names}


# ----------------------------------------------------------------------------- evaluate

# Per-block sweeps fit depth x tasks probes, so they use a lighter attentive probe: 15 epochs
# instead of 40. Good enough to rank blocks; the headline numbers come from the full probe on
# the final output.
BLOCK_SETTINGS = ProbeSettings(epochs=15)


def _fit_task(
    kind: ProbeKind,
    task: Task,
    train: torch.Tensor,
    val: torch.Tensor,
    data: EvalData,
    settings: ProbeSettings,
    seed: int,
) -> dict[str, float]:
    return fit_probe(
        "dense" if task.kind == "dense" else kind,
        train,
        data.train_labels[task.name],
        val,
        data.val_labels[task.name],
        n_classes=task.n_classes,
        settings=settings,
        seed=seed,
    )


def evaluate_encoder(
    model: nn.Module,
    cfg: ExperimentConfig,
    tasks: Sequence[str] | None = None,
    *,
    per_block: bool = False,
    probe: Literal["attentive", "linear", "both"] = "attentive",
    train_clips: int | None = None,
    val_clips: int | None = None,
    seed: int = 0,
    data: EvalData | None = None,
    settings: ProbeSettings = ProbeSettings(),
    block_settings: ProbeSettings = BLOCK_SETTINGS,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Probe a frozen encoder on every task of its dataset; returns ``{metric key: value}``.

    Keys: ``eval/<task>/<metric>`` for the attentive probe on the final (normed) encoder output
    (``acc`` for class tasks, ``absrel`` and ``delta1`` for depth); with ``probe`` "linear" or
    "both", ``eval/<task>/linear_acc`` (mean-pooled linear probe; with "linear" alone the
    attentive keys are left out); with ``per_block``, ``eval/<task>/block_03/<metric>`` for every
    block's raw output using the lighter ``block_settings`` probe. Dense tasks always use the
    per-token dense probe. ``data`` reuses clips drawn by :func:`load_eval_data` (otherwise they
    are drawn here from ``cfg.data``).
    """
    if probe not in ("attentive", "linear", "both"):
        raise LayerLockError(f"probe must be attentive, linear or both, got {probe!r}")
    if data is None:
        data = load_eval_data(cfg, tasks, train_clips=train_clips, val_clips=val_clips, progress=progress)
    chosen = select_tasks(data.tasks, tasks)
    # One encoder pass per split: the headline probe reads the normed output, the sweep every block.
    keys: list[LayerKey] = ["final", *(range(len(model.blocks)) if per_block else ())]
    feats_train = _extract(model, data.train_video, keys, device=device, batch_size=64, progress=progress, total=None)
    feats_val = _extract(model, data.val_video, keys, device=device, batch_size=64, progress=progress, total=None)

    # (key prefix, probe kind, task, feature layer, settings) for every fit, then one progress bar.
    jobs: list[tuple[str, ProbeKind, Task, LayerKey, ProbeSettings]] = []
    for name, task in chosen.items():
        if task.kind == "dense" or probe in ("attentive", "both"):
            jobs.append((f"eval/{name}/", "attentive", task, "final", settings))
        if task.kind == "class" and probe in ("linear", "both"):
            jobs.append((f"eval/{name}/linear_", "linear", task, "final", settings))
        if per_block:
            jobs += [
                (f"eval/{name}/block_{i:02d}/", "attentive", task, i, block_settings) for i in range(len(model.blocks))
            ]
    out: dict[str, float] = {}
    for prefix, kind, task, layer, s in tqdm(jobs, desc="probes", unit="fit", leave=False, disable=not progress):
        for metric, value in _fit_task(kind, task, feats_train[layer], feats_val[layer], data, s, seed).items():
            out[prefix + metric] = value
    return out


# ----------------------------------------------------------------------------- probe for attribution


class ProbedEncoder(nn.Module):
    """``video (B, 3, T, H, W)`` -> probe logits ``(B, n_classes)`` through the full encoder."""

    def __init__(self, model: nn.Module, probe: nn.Module) -> None:
        super().__init__()
        self.model, self.probe = model, probe

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.probe(self.model.forward_encoder(video))


def checkpoint_tasks(checkpoint: dict) -> tuple[dict[str, int], int]:
    """Classification tasks (name -> classes) of a checkpoint's dataset and its validation size."""
    cfg = config_from_dict(checkpoint.get("config") or {}, "checkpoint config")
    ds = build_dataset(cfg.data, "val")
    tasks = {name: int(t.n_classes) for name, t in ds.tasks.items() if t.kind == "class" and t.n_classes}
    return tasks, len(ds)


@torch.no_grad()
def _final_tokens(model: nn.Module, video: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    return torch.cat([model.forward_encoder(v) for v in video.split(batch_size)])


def fit_linear_probe(
    model: nn.Module,
    cfg: ExperimentConfig,
    task: str,
    n_train: int = 96,
    n_val: int = 32,
    epochs: int = 150,
    seed: int = 0,
) -> tuple[nn.Module, float, int]:
    """Fit ``LinearProbe`` on frozen final tokens of ``n_train`` train clips (full batch AdamW).

    Returns ``(probe, val_accuracy, n_classes)``; the global RNG is left untouched.
    """
    train_ds, val_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    if task not in train_ds.tasks or train_ds.tasks[task].kind != "class":
        raise LayerLockError(f"dataset {cfg.data.name} has no classification task '{task}'")
    n_classes = int(train_ds.tasks[task].n_classes)
    x_tr, y_tr = get_batch(train_ds, range(min(n_train, len(train_ds))))
    x_va, y_va = get_batch(val_ds, range(min(n_val, len(val_ds))))
    f_tr, f_va = _final_tokens(model, x_tr), _final_tokens(model, x_va)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(dim=f_tr.shape[-1], n_out=n_classes)
        opt = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-3)
        with torch.enable_grad():
            for _ in range(epochs):
                loss = nn.functional.cross_entropy(probe(f_tr), y_tr[task])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    probe.eval()
    freeze_all(probe)
    with torch.no_grad():
        acc = float((probe(f_va).argmax(-1) == y_va[task]).float().mean())
    return probe, acc, n_classes


__all__ = [
    "AttentiveProbe",
    "ProbedEncoder",
    "checkpoint_tasks",
    "fit_linear_probe",
    "BLOCK_SETTINGS",
    "DenseProbe",
    "EvalData",
    "LinearProbe",
    "ProbeSettings",
    "build_probe",
    "default_clips",
    "depth_metrics",
    "evaluate_encoder",
    "extract_features",
    "fit_probe",
    "load_eval_data",
    "pool_dense_targets",
    "select_tasks",
]
