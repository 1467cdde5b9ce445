"""Per-block convergence probes on a fixed probe batch, with the position signal controlled.

Every ``probe.every`` steps the encoder runs on a fixed batch of unmasked clips (``probe.batch_size``
clips of the held-out split). Every clip is read at the **same** token positions: all tokens when
the clip has at most ``probe.tokens_per_clip`` of them, else one fixed seeded subset. Features are
kept as ``(clips, positions, dim)``.

Any model: :class:`ProbeRunner` reads the outputs of any list of modules through forward hooks
that exist only while the probe runs, in eval mode, under ``no_grad``, with the RNG kept
(``core.monitor.LayerMonitor`` is the public API; the trainer uses it too). An output becomes
``(clips, positions, dim)`` by :func:`clips_positions_dim`: ``(B, D)`` one position, ``(B, N, D)``
tokens, ``(B, C, *grid)`` conv maps with channels as dim and grid cells as positions.

Why positions are controlled: every token carries the fixed sin-cos position table, and in
moving_digits most tubelets are black, so a large part of a block's raw variance is position
signal that never trains. Pooling tokens drawn at random positions lets CKA, effective rank and the
feature spread measure that fixed signal. Here each position's mean over the probe clips is
removed first (:func:`centre_positions`, the one place that centres), so what is measured is how
features vary with the *content* of a clip at a fixed place:

* ``cka_prev`` / ``cka_init`` / ``cka_final``: linear CKA (debiased unless ``probe.debiased`` is
  false) of the position-centred features (rows = clips x positions) against the previous
  probe, step 0, and the last probe;
* ``eff_rank``: entropy effective rank of the position-centred features, i.e. of the
  within-position covariance averaged over positions;
* ``feat_std``: spread across clips, at each fixed position, of the per-token layer-normalised
  features (the form a latent target takes), averaged over positions and dims. About 1 when
  every clip differs at every position; lower on mostly blank clips (mae_tiny on moving_digits
  reads 0.03-0.17), so compare runs on the same data; ~0 when features depend on position only
  (whatever the size of the position signal) or when every clip maps to the same direction --
  the naive-latent collapse.

See :func:`feature_stats`. When training ends, ``cka_final`` compares every stored probe with the
last one.

Storage: features are stored position-centred (centred in float64, then rounded), in bfloat16:
float32's exponent range, so no activation can overflow as float16 (max 65504) could, and the
rounding error (relative 2^-9) scales with the content, not with the position signal that was
removed. One probe keeps ``depth * batch_size * positions * dim * 2`` bytes. Defaults on mae_tiny
(8 blocks, dim 128, 64 tokens per clip): 32 clips x 32 positions = 1024 CKA rows per block,
8 * 32 * 32 * 128 * 2 B = 2 MiB per probe, 14 MiB for a 300-step run probed every 50 steps
(7 probes), each probe's features once in its own file ``probe/step_NNNNNN.pt`` (a checkpoint keeps
only the probe steps, so its size does not grow with the probes before it); the probe costs one
forward of 32 unmasked clips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.cka import PreparedFeatures, effective_rank, linear_cka, prepare, prepared_cka
from core.config import ProbeConfig
from core.errors import LayerLockError
from core.schema import block_key

STORE_DTYPE = torch.bfloat16
# float32 rounding leaves ~1e-7 of a value behind when its mean is subtracted; spread across clips
# below this fraction of the features' size is indistinguishable from it.
_CONSTANT_RTOL = 1e-6


def probe_positions(n_tokens: int, tokens_per_clip: int, seed: int = 0) -> torch.Tensor:
    """The token positions every probe clip is read at: ``(P,)`` sorted indices.

    All tokens when ``n_tokens <= tokens_per_clip``; else a subset fixed by ``seed``. A seeded
    subset rather than an evenly strided one: a stride aliases with the (t, h, w) token grid
    (stride 2 on a 4 x 4 x 4 grid keeps two of the four columns only).
    """
    if n_tokens <= tokens_per_clip:
        return torch.arange(n_tokens)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_tokens, generator=g)[:tokens_per_clip].sort().values


def _check(x: torch.Tensor, name: str = "features") -> None:
    if x.ndim != 3:
        raise LayerLockError(f"{name} must have shape (clips, positions, dim), got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise LayerLockError(f"{name} need at least 2 clips to measure a spread across clips, got {x.shape[0]}")


def centre_positions(x: torch.Tensor) -> torch.Tensor:
    """Remove each position's mean over clips: ``(C, P, D)`` -> ``(C, P, D)`` float64.

    The one place where the position signal is removed; CKA, effective rank and the spread all
    read features through it. Features that do not vary across clips beyond float32 rounding
    (centred norm below ``_CONSTANT_RTOL`` of the raw norm) come back as exact zeros, so a
    position-only block reads as constant (CKA 0, effective rank 0), not as rounding noise.
    """
    _check(x)
    return _centred(x)


def _centred(x: torch.Tensor) -> torch.Tensor:
    """:func:`centre_positions` of ``(C, P, D)`` features or of a stack ``(L, C, P, D)`` of
    blocks of one shape (each block's constant test on its own)."""
    x = x.double()
    c = x - x.mean(dim=-3, keepdim=True)
    dims = (-3, -2, -1)
    constant = torch.linalg.vector_norm(c, dim=dims) <= _CONSTANT_RTOL * torch.linalg.vector_norm(x, dim=dims)
    return torch.where(constant[..., None, None, None], 0.0, c) if bool(constant.any()) else c


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Position-centred features as a CKA matrix: rows = clips x positions (per block of a stack)."""
    return _centred(x).flatten(-3, -2)


def probe_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA of two ``(C, P, D)`` feature sets of the same clips and positions, position-centred."""
    if x.shape[:2] != y.shape[:2]:
        raise LayerLockError(f"probe features describe different clips/positions: {tuple(x.shape)} vs {tuple(y.shape)}")
    _check(x)
    _check(y)
    return linear_cka(_rows(x), _rows(y), debiased)


def _by_shape(features: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """The blocks of one probe grouped by shape: ``(block indices, stacked features)`` per shape,
    so that every metric is computed in one pass per group (a probe of a 12-block transformer
    is then one batched computation, not twelve: at probe sizes on a CPU, the cost of each
    call is a large part of the whole)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(features):
        _check(f, f"features of block {i}")
        groups.setdefault(tuple(f.shape), []).append(i)
    return [(idx, torch.stack([features[i] for i in idx])) for idx in groups.values()]


# One probe in CKA-ready form: per group of blocks of one shape, their indices and the stack.
ProbeForms = list[tuple[list[int], PreparedFeatures]]


def _prepare_probe(features: Sequence[torch.Tensor]) -> ProbeForms:
    """Every block's ``(C, P, D)`` features of one probe in CKA-ready form (as :func:`probe_cka` reads them)."""
    return [(idx, prepare(_rows(x))) for idx, x in _by_shape(features)]


def _probe_ckas(a: ProbeForms, b: ProbeForms, debiased: bool) -> list[float]:
    """Per block, the CKA of probe ``a`` against probe ``b`` (the same blocks and shapes)."""
    if [idx for idx, _ in a] != [idx for idx, _ in b]:
        raise LayerLockError("the blocks' probe features changed shape between two probes of one run")
    out = [0.0] * sum(len(idx) for idx, _ in a)
    for (idx, p), (_, q) in zip(a, b):
        for i, value in zip(idx, prepared_cka(p, q, debiased).tolist()):
            out[i] = value
    return out


def feature_stats(x: torch.Tensor) -> dict[str, float]:
    """Collapse indicators of one block's probe features ``x (clips, positions, dim)``.

    Everything is measured across clips at each fixed position, then averaged over positions:

    * ``feat_std``: std over clips of the per-token layer-normalised features, averaged over
      positions and dims: ~1 when every clip differs at every position (lower on mostly blank
      clips), ~0 if features depend on position only or every clip maps to the same direction;
    * ``eff_rank``: entropy effective rank of the position-centred features (rows = clips x
      positions), i.e. of the within-position covariance averaged over positions; in
      ``[1, min(C*P - P, D)]``, 0.0 if nothing varies across clips;
    * ``position_share``: the fraction of the layer-normalised features' variance over all
      clips and positions that is explained by position alone (what a probe that pools random
      positions would mostly see when it is close to 1).
    """
    _check(x)
    return {key: float(value[0]) for key, value in _feature_stats(x[None]).items()}


def _feature_stats(x: torch.Tensor, centred: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:func:`feature_stats` of a stack ``(L, C, P, D)`` of blocks of one shape: each value ``(L,)``.
    ``centred``: ``_centred(x)`` where the caller has it already."""
    normed = F.layer_norm(x.double(), x.shape[-1:])
    within = _centred(normed).square()
    dims = (-3, -2, -1)
    feat_std = within.sum(dim=-3).div(x.shape[-3] - 1).sqrt().mean(dim=(-2, -1))
    total = (normed - normed.mean(dim=(-3, -2), keepdim=True)).square().sum(dim=dims)
    share = torch.where(total > 0, 1.0 - within.sum(dim=dims) / torch.where(total > 0, total, 1.0), 0.0)
    rows = (_centred(x) if centred is None else centred).flatten(-3, -2)
    return {"feat_std": feat_std, "eff_rank": effective_rank(rows), "position_share": share.clamp_min(0.0)}


def clips_positions_dim(output: Any) -> torch.Tensor:
    """One block's output as probe features ``(clips, positions, dim)``.

    The rule for any module: ``(B, D)`` is one position; ``(B, N, D)`` is a batch-first token
    sequence, as it is; ``(B, C, *grid)`` with ``grid`` of 2 or more axes (a conv map,
    ``(B, C, T, H, W)`` or ``(B, C, H, W)``) has its channels as dim and each grid cell as a
    position. A tuple or list output is read at its first element (blocks that also return
    attention weights or a cache). Anything else: pass ``features=`` to the probe.
    """
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise LayerLockError(
            f"a block returned {type(output).__name__}, not a tensor: pass features=fn "
            "that maps its output to (clips, positions, dim)"
        )
    if output.ndim == 2:
        return output[:, None, :]
    if output.ndim == 3:
        return output
    if output.ndim >= 4:
        return output.flatten(2).transpose(1, 2)
    raise LayerLockError(f"a block output of shape {tuple(output.shape)} has no clips x positions x dim reading")


@contextlib.contextmanager
def rng_preserved(modules: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Run a block of code and put the random number generators back as they were (CPU, and
    the CUDA devices of ``modules`` that are initialised): a probe or a FLOP count in the
    middle of training must not shift the random stream (dropout, data order) of the run."""
    devices = (
        sorted({p.device.index or 0 for m in modules for p in m.parameters() if p.device.type == "cuda"})
        if torch.cuda.is_initialized()
        else []
    )  # no CUDA generator to keep: skip the walk over parameters
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def inference_mode_of(modules: Iterable[nn.Module], keep_rng: bool = True) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode (BatchNorm reads its running statistics and
    does not update them, dropout is off), under ``no_grad``, with the RNG kept (``keep_rng``;
    off in a background thread, where restoring the generator would rewind the training
    thread's draws); each submodule's own train/eval flag is restored afterwards."""
    modules = list(modules)
    flags = [(m, m.training) for root in modules for m in root.modules()]
    # Module.training is a plain attribute: set through __dict__, not nn.Module.__setattr__'s
    # type checks (half a millisecond a probe on a 100-module model).
    for m, _ in flags:
        m.__dict__["training"] = False
    try:
        with torch.no_grad(), rng_preserved(modules) if keep_rng else contextlib.nullcontext():
            yield
    finally:
        for m, was in flags:
            m.__dict__["training"] = was


def capture_block_outputs(
    blocks: Sequence[nn.Module], run: Callable[[], Any], keep: Callable[[int, Any], torch.Tensor]
) -> list[torch.Tensor]:
    """Run ``run()`` with a forward hook on every block; ``keep(i, output)`` turns block i's
    output into what is kept (the last call wins when a block runs more than once). The hooks
    exist only during this call, so training forwards never see them."""
    kept: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(i: int):
        def store(module: nn.Module, args: tuple, output: Any) -> None:
            kept[i] = keep(i, output)

        return store

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(blocks)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, k in enumerate(kept) if k is None]
    if missing:
        raise LayerLockError(
            f"block(s) {', '.join(map(str, missing))} did not run during the probe forward: "
            "the blocks must be modules that the forward calls"
        )
    return kept  # type: ignore[return-value]


def encoder_forward(model: nn.Module, video: torch.Tensor) -> torch.Tensor:
    """The trainer's probe forward: a VideoMAE's encoder on unmasked clips, on the model's device."""
    return model.forward_encoder(video.to(next(model.parameters()).device), None)


@dataclasses.dataclass(frozen=True)
class ProbeTarget:
    """What a probe reads when it is not the runner's own blocks: ``blocks`` in depth order,
    ``forward(batch)`` that runs them, ``owners`` put in eval mode meanwhile."""

    blocks: Sequence[nn.Module]
    forward: Callable[[Any], Any]
    owners: Sequence[nn.Module]


class ProbeRunner:
    """The fixed-batch probe of a list of blocks: features, per-block metrics, stored history.

    Any model (:class:`core.monitor.LayerMonitor`): ``blocks`` in depth order, ``forward(batch)``
    runs the model on the probe batch, ``owner`` (the model) is put in eval mode for it. The
    trainer's probe is the same on a VideoMAE: ``ProbeRunner(cfg, video, n_tokens, seed)`` and
    ``probe(model, step)`` read ``model.blocks`` on the encoder's unmasked forward.

    Positions: each block's output is read as ``(clips, positions, dim)``
    (:func:`clips_positions_dim`, or ``features``), at the same positions for every clip: all of
    them when there are at most ``cfg.tokens_per_clip``, else a subset fixed by ``seed``
    (:func:`probe_positions`). With ``n_positions`` the positions are fixed up front, the same
    for every block (the trainer: ``n_tokens``); without it each block's are chosen at its first
    probe from its own number of positions.
    """

    def __init__(
        self,
        cfg: ProbeConfig,
        batch: Any,
        n_positions: int | None = None,
        seed: int = 0,
        *,
        blocks: Sequence[nn.Module] | None = None,
        forward: Callable[[Any], Any] | None = None,
        owner: nn.Module | None = None,
        features: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        """``batch``: the fixed probe batch (for the trainer, ``video (C, channels, T, H, W)``,
        held-out unmasked clips); whatever ``forward`` takes."""
        self.cfg = cfg
        self.batch = batch
        self.seed = seed
        self.blocks = list(blocks) if blocks is not None else None
        self.forward = forward
        self.owner = owner
        self.to_features = features or clips_positions_dim
        # (P,), the same for every clip (and block); None: chosen per block at the first probe.
        self.positions = probe_positions(n_positions, cfg.tokens_per_clip, seed) if n_positions else None
        self.block_positions: list[torch.Tensor | None] = []
        self.steps: list[int] = []
        self.features: list[list[torch.Tensor]] = []  # per probe, per block: (C, P, dim) position-centred bf16
        # CKA-ready forms of the first and the latest probe, kept between probes so that each
        # probe prepares only its own features (core.cka.prepare); rebuilt after a resume.
        self._prepared: dict[str, ProbeForms] = {}

    def _positions(self, i: int, n: int) -> torch.Tensor:
        if self.positions is not None:
            return self.positions
        while len(self.block_positions) <= i:
            self.block_positions.append(None)
        if self.block_positions[i] is None:
            self.block_positions[i] = probe_positions(n, self.cfg.tokens_per_clip, self.seed)
        return self.block_positions[i]

    def _keep(self, i: int, output: Any) -> torch.Tensor:
        x = self.to_features(output)
        if x.ndim != 3:
            raise LayerLockError(f"features of block {i} must be (clips, positions, dim), got {tuple(x.shape)}")
        pos = self._positions(i, x.shape[1])
        if int(pos.max()) >= x.shape[1]:
            raise LayerLockError(f"block {i} now has {x.shape[1]} positions, fewer than at its first probe")
        return x[:, pos.to(x.device)].to("cpu", torch.float32)

    def extract(self, model: nn.Module | None = None, on: ProbeTarget | None = None) -> list[torch.Tensor]:
        """Every block's output at the probe positions: per block ``(C, P, dim)`` float32 on the CPU.
        ``model``: a VideoMAE to probe (the trainer's form); ``on``: other blocks and forward (a
        copy of the model, probed in a background thread); else the blocks given at construction."""
        if on is not None:
            with inference_mode_of(on.owners, keep_rng=False):
                return capture_block_outputs(on.blocks, lambda: on.forward(self.batch), self._keep)
        if model is not None:
            blocks, forward, owners = model.blocks, functools.partial(encoder_forward, model), [model]
        elif self.blocks is not None and self.forward is not None:
            blocks, forward = self.blocks, self.forward
            owners = [self.owner] if self.owner is not None else self.blocks
        else:
            raise LayerLockError("ProbeRunner.extract needs a model, or blocks and forward at construction")
        with inference_mode_of(owners):
            return capture_block_outputs(blocks, lambda: forward(self.batch), self._keep)

    def probe(self, model: nn.Module | None = None, step: int = 0, on: ProbeTarget | None = None) -> dict[str, float]:
        """Run the probe at ``step``; returns per-block metrics keyed like ``cka_prev/block_03``.
        ``model``, ``on``: what to probe (:meth:`extract`)."""
        feats = self.extract(model, on)
        n = len(feats)
        stored: list[torch.Tensor | None] = [None] * n
        now: ProbeForms = []  # what _prepare_probe(stored) gives, from the stacks at hand
        stats = {"eff_rank": [0.0] * n, "feat_std": [0.0] * n}
        for idx, x in _by_shape(feats):
            centred = _centred(x)
            kept = centred.to(STORE_DTYPE)
            now.append((idx, prepare(_rows(kept))))  # the same numbers as probe_cka(stored[b], ...)
            block_stats = {key: values.tolist() for key, values in _feature_stats(x, centred).items()}
            for j, i in enumerate(idx):
                stored[i] = kept[j]
                for key, values in stats.items():
                    values[i] = block_stats[key][j]
        if self.features:
            prev = _probe_ckas(now, self._prepared_of("prev", -1), self.cfg.debiased)
            init = _probe_ckas(now, self._prepared_of("init", 0), self.cfg.debiased)
        else:
            prev = init = [1.0] * n
        out: dict[str, float] = {}
        for b in range(n):
            out[block_key("cka_prev", b)] = prev[b]
            out[block_key("cka_init", b)] = init[b]
            out[block_key("eff_rank", b)] = stats["eff_rank"][b]
            out[block_key("feat_std", b)] = stats["feat_std"][b]
        self.steps.append(step)
        self.features.append(stored)
        self._prepared["prev"] = now
        self._prepared.setdefault("init", now)
        return out

    def _prepared_of(self, which: str, index: int) -> list[PreparedFeatures]:
        """The kept CKA-ready form of probe ``index`` (``prev``: the latest, ``init``: the first)."""
        if which not in self._prepared:
            self._prepared[which] = _prepare_probe(self.features[index])
        return self._prepared[which]

    def final(self) -> dict[int, dict[str, float]]:
        """``cka_final`` for every stored probe step against the last probe: {step: {key: value}}."""
        if not self.features:
            return {}
        last = _prepare_probe(self.features[-1])
        return {
            s: {
                block_key("cka_final", b): value
                for b, value in enumerate(_probe_ckas(_prepare_probe(feats), last, self.cfg.debiased))
            }
            for s, feats in zip(self.steps, self.features)
        }

    def _saved_positions(self) -> torch.Tensor | list[torch.Tensor | None]:
        if self.positions is not None:
            return self.positions.clone()
        return [None if p is None else p.clone() for p in self.block_positions]

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the probe steps and positions. Not the features: those of each
        probe are stored once, in their own file (:meth:`features_at`), so a checkpoint does not
        grow with every probe taken before it."""
        return {"steps": list(self.steps), "positions": self._saved_positions()}

    def load_state_dict(self, state: dict, features_of: Callable[[int], list[torch.Tensor]] | None = None) -> None:
        """Restore from :meth:`state_dict`; ``features_of(step)`` reads one probe's stored
        features (checkpoints written before features had their own files carry them inline)."""
        saved = state.get("positions")
        if self.positions is not None:
            same = isinstance(saved, torch.Tensor) and torch.equal(saved, self.positions)
        else:  # chosen per block at the first probe: take the saved ones if nothing was probed yet
            same = isinstance(saved, list) and (
                not self.steps
                or all(
                    (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                    for a, b in zip(saved, self.block_positions)
                )
            )
        if not same:
            # Older checkpoints kept random tokens per clip (flat rows): CKA against them is meaningless.
            raise LayerLockError(
                "the checkpoint's probe features were taken at other token positions (an older "
                "probe format or another probe config); this run cannot resume, start a new one"
            )
        if self.positions is None:
            self.block_positions = list(saved)
        self.steps = list(state["steps"])
        self._prepared = {}
        if "features" in state:
            self.features = [list(f) for f in state["features"]]
        elif features_of is not None:
            self.features = [list(features_of(s)) for s in self.steps]
        else:
            raise LayerLockError("the checkpoint's probe features are stored apart and no reader was given")

    def features_at(self, index: int = -1) -> dict:
        """One probe as a file's content: its step, positions and features (per block
        ``(clips, positions, dim)``, position-centred, bfloat16)."""
        return {
            "step": self.steps[index],
            "features": list(self.features[index]),
            "positions": self._saved_positions(),
            "layout": "per block: (clips, positions, dim), position-centred, bfloat16",
        }


def block_grad_norms(params: Sequence[Sequence[nn.Parameter]]) -> dict[str, float]:
    """L2 norm of each trainable block's gradient (frozen blocks are skipped: they have none).
    ``params``: each block's parameters (``list(block.parameters())``, read once by the caller:
    walking a block's submodules at every log step costs more than the norms on a small model)."""
    out = {}
    for b, block in enumerate(params):
        grads = [p.grad for p in block if p.grad is not None]
        if grads:
            out[block_key("grad_norm", b)] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    return out


def snapshot_blocks(params: Sequence[Sequence[nn.Parameter]]) -> list[list[torch.Tensor] | None]:
    """Copies of trainable blocks' parameters (``params``: as :func:`block_grad_norms`), to
    measure the next update's size."""
    return [[p.detach().clone() for p in block] if any(p.requires_grad for p in block) else None for block in params]


def update_ratios(
    params: Sequence[Sequence[nn.Parameter]], before: list[list[torch.Tensor] | None]
) -> dict[str, float]:
    """||W_after - W_before|| / ||W_before|| per trainable block (``params``: as
    :func:`block_grad_norms`). Consumes ``before`` (the snapshot's copies are overwritten by the
    difference: no second copy of the weights)."""
    out = {}
    for b, (block, old) in enumerate(zip(params, before)):
        if old is None:
            continue
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(old)))
        torch._foreach_sub_(old, [p.detach() for p in block])  # W_before - W_after, in place
        delta = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(old)))
        out[block_key("update_ratio", b)] = float(delta / norm.clamp_min(1e-12))
    return out
