"""Synthetic runs with KNOWN per-block convergence, for tests and the dashboard bench.

Not used by the product. The frame builders are pure functions of their arguments and a seed
(no MLflow, no torch); :func:`create_run_from_frames` logs such frames as one MLflow run with
the trainer's key schema (the only writer in ``analysis``; it reuses ``analysis.io``'s client).

Ground truth of :func:`synthetic_layer_metrics` for a block with convergence step ``c``:

- ``cka_final`` stays <= 0.87 before ``c`` (one transient spike to 0.97 near ``c/2`` when
  ``dips``), then >= 0.955 from ``c`` on, and is exactly 1.0 at the last probe. The post-hoc
  rule must return the first probe step >= ``c``.
- ``cka_prev`` at probe s is >= 0.991 iff the previous probe s-P is >= ``c`` (both compared
  feature sets are post-convergence), else <= 0.98 (one isolated spike to 0.996 near ``c/2``
  when ``dips``). At step 0 it is 1.0 (no predecessor; the rule must ignore it).
- ``grad_norm`` (log steps) decays as ``exp(0.003 * (c - t))`` before ``c`` (a 14% drop per
  50 steps) and is flat at 1 after, with 2% multiplicative noise.

A block with ``c = None`` never converges: ``cka_final`` stays <= 0.9 until the last probe,
``cka_prev`` <= 0.98, and ``grad_norm`` keeps growing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import io
from analysis.schedule import frozen_curve
from core import schema

GRAD_DECAY = 0.003  # per step; see the module docstring


def probe_steps(total_steps: int, probe_every: int) -> np.ndarray:
    """Probes at 0, P, 2P, ... and at ``total_steps`` (after the last update)."""
    steps = np.arange(0, total_steps + 1, probe_every)
    return steps if steps[-1] == total_steps else np.append(steps, total_steps)


def log_steps(total_steps: int, log_every: int) -> np.ndarray:
    """Training steps 0 .. total_steps-1 that log run-level metrics."""
    return np.arange(0, total_steps, log_every)


def synthetic_layer_metrics(
    conv_steps: Sequence[int | None],
    total_steps: int = 600,
    probe_every: int = 50,
    log_every: int = 10,
    seed: int = 0,
    dips: bool = True,
    collapse: bool = False,
    run_id: str = "synthetic",
) -> pd.DataFrame:
    """Tidy per-block metrics (``run_id, step, block, metric, value``), block b converging at
    ``conv_steps[b]`` (None: never). ``collapse`` makes ``eff_rank``/``feat_std`` fall to ~0
    as a naive-latent run's would."""
    rng = np.random.default_rng(seed)
    probes = probe_steps(total_steps, probe_every)
    logs = log_steps(total_steps, log_every)
    last = probes[-1]
    rows: list[tuple[int, int, str, float]] = []

    def add(block: int, metric: str, steps: np.ndarray, values: np.ndarray) -> None:
        rows.extend((int(s), block, metric, float(v)) for s, v in zip(steps, values, strict=True))

    for b, c in enumerate(conv_steps):
        noise = rng.normal(0.0, 1.0, size=(4, probes.size))
        if c is None:
            final = np.clip(0.4 + 0.4 * probes / last + 0.02 * noise[0], 0.0, 0.9)
            prev = np.clip(0.9 + 0.03 * noise[1], 0.0, 0.98)
            init = np.clip(1.0 - 0.6 * probes / last, 0.0, 1.0)
            grad = np.exp(GRAD_DECAY * logs)
        else:
            after = probes >= c
            final = np.where(
                after,
                np.clip(0.965 + 0.035 * (probes - c) / max(last - c, 1) + 0.005 * noise[0], 0.955, 1.0),
                np.clip(0.3 + 0.55 * probes / max(c, 1) + 0.01 * noise[0], 0.0, 0.87),
            )
            stable = (probes - probe_every) >= c
            prev = np.where(
                stable, np.clip(0.995 + 0.002 * noise[1], 0.991, 1.0), np.clip(0.9 + 0.03 * noise[1], 0.0, 0.98)
            )
            if dips:
                spike = int(np.argmin(np.abs(probes - c / 2)))
                if probes[spike] + probe_every < c and spike > 0:  # stays strictly pre-convergence
                    final[spike] = 0.97
                    prev[spike] = 0.996
            init = np.clip(1.0 - 0.6 * np.minimum(probes, c) / max(c, 1), 0.0, 1.0)
            grad = np.exp(GRAD_DECAY * np.maximum(c - logs, 0))
        final[-1] = 1.0  # the last probe is compared with itself
        prev[0] = 1.0  # no predecessor at step 0
        grad = grad * (1.0 + 0.02 * rng.normal(size=logs.size))
        if collapse:
            eff_rank = 1.0 + 15.0 * np.exp(-probes / (0.2 * last)) + 0.05 * np.abs(noise[2])
            feat_std = 0.01 + np.exp(-probes / (0.2 * last))
        else:
            eff_rank = 16.0 + 0.5 * noise[2]
            feat_std = 1.0 + 0.02 * noise[3]
        add(b, "cka_final", probes, final)
        add(b, "cka_prev", probes, prev)
        add(b, "cka_init", probes, init)
        add(b, "eff_rank", probes, eff_rank)
        add(b, "feat_std", probes, feat_std)
        add(b, "grad_norm", logs, grad)
        add(b, "update_ratio", logs, 1e-3 * grad / grad[0])

    frame = pd.DataFrame(rows, columns=["step", "block", "metric", "value"])
    frame.insert(0, "run_id", run_id)
    return frame.sort_values(["metric", "block", "step"], kind="stable").reset_index(drop=True)


def synthetic_flop_model(
    n_blocks: int,
    block_forward: float = 1.0e8,
    other: float = 2.0e8,
    batch_size: int = 32,
    objective: str = "pixel",
) -> dict[str, Any]:
    """A flop model in the trainer's format: each block costs ``block_forward`` forward and
    twice that backward (the usual 1:2 ratio); freezing k blocks saves their backward.
    ``other`` stands for embedding, decoder and loss (always trained)."""
    full = n_blocks * 3 * block_forward + other
    return {
        "n_blocks": n_blocks,
        "batch_size": batch_size,
        "objective": objective,
        "per_step": {str(k): full - 2 * block_forward * k for k in range(n_blocks)},
    }


def synthetic_time_model(
    flop_model: dict[str, Any],
    step_s: float = 0.1,
    unshrinkable: float = 0.25,
    measured: tuple[int, ...] | None = None,
    overhead_s: float = 0.0,
    trained: dict[int, int] | None = None,
) -> dict[str, Any]:
    """A ``time_model.json`` in the trainer's format whose steps follow the affine FLOP model:
    ``t(k) = step_s * (unshrinkable + (1 - unshrinkable) * flops(k) / flops(0))``.

    ``measured``: the stages calibrated (default: 0 and the deepest, as an MAE run's), five
    steps each; ``trained``: training steps per stage (default 100 at k=0, an MAE run);
    ``overhead_s``: probe time per step.
    """
    per = {int(k): float(v) for k, v in flop_model["per_step"].items()}
    ks = measured if measured is not None else (0, max(per))
    trained = trained or {0: 100}

    def t(k: int) -> float:
        return step_s * (unshrinkable + (1 - unshrinkable) * per[k] / per[0])

    def summary(k: int, n: int) -> dict[str, Any]:
        return {"median_s": t(k), "low_s": t(k), "high_s": t(k), "n": n}

    return {
        "kind": "measured step time per schedule stage",
        "n_blocks": len(per),
        "training": {str(k): {**summary(k, n), "steps": n, "mean_s": t(k)} for k, n in trained.items()},
        "calibration": {str(k): summary(k, 5) for k in ks},
        "overhead_s_per_step": overhead_s,
        "total_s": sum(n * (t(k) + overhead_s) for k, n in trained.items()),
        "total_steps": sum(trained.values()),
        "flops_per_step": {str(k): v for k, v in per.items()},
    }


def synthetic_history(
    total_steps: int,
    log_every: int = 10,
    flop_model: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = None,
    loss_start: float = 1.0,
    loss_end: float = 0.3,
    seconds_per_flop: float = 1e-11,
    seed: int = 0,
    run_id: str = "synthetic",
) -> pd.DataFrame:
    """Tidy run-level history (``run_id, step, metric, value``) with the trainer's keys.

    ``train/loss`` decays exponentially from ``loss_start`` to about ``loss_end`` with 1% noise;
    ``train/flops`` is cumulative through the logged step (inclusive) under ``schedule``;
    ``train/wall_s`` is proportional to it.
    """
    rng = np.random.default_rng(seed)
    steps = log_steps(total_steps, log_every)
    sched = schedule or {"n_blocks": 1, "stages": []}
    frozen = frozen_curve(sched, total_steps)
    fm = flop_model or synthetic_flop_model(max(int(sched["n_blocks"]), 1))
    per_k = np.array([fm["per_step"][str(k)] for k in range(len(fm["per_step"]))], dtype=float)
    cumulative = np.cumsum(per_k[frozen])[steps]
    loss = loss_end + (loss_start - loss_end) * np.exp(-5.0 * steps / total_steps)
    loss = loss * (1.0 + 0.01 * rng.normal(size=steps.size))
    columns = {
        schema.LOSS: loss,
        schema.LOSS_PIXEL: loss,
        schema.LR: np.full(steps.size, 1.5e-3),
        schema.FROZEN_BLOCKS: frozen[steps].astype(float),
        schema.FLOPS: cumulative,
        schema.WALL_S: cumulative * seconds_per_flop,
    }
    frame = pd.DataFrame(
        [(int(s), k, float(v)) for k, values in columns.items() for s, v in zip(steps, values, strict=True)],
        columns=["step", "metric", "value"],
    )
    frame.insert(0, "run_id", run_id)
    return frame.sort_values(["metric", "step"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- logging a synthetic run


def create_run_from_frames(
    experiment: str,
    *,
    uri: str | None = None,
    layer_df: pd.DataFrame | None = None,
    history: pd.DataFrame | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    json_artifacts: dict[str, Any] | None = None,
    layer_artifact: bool = True,
    layer_history: bool = True,
    artifact_root: str | None = None,
    run_name: str | None = None,
    status: str = "FINISHED",
    start_time: int | None = None,
) -> str:
    """Log a run from tidy frames with the trainer's key schema; returns the run id.

    For tests and the dashboard bench; real runs are logged by ``core``. ``layer_df`` goes to
    ``<metric>/block_NN`` histories (``layer_history``) and/or the ``layer_metrics.parquet``
    artifact (``layer_artifact``).
    ``artifact_root`` sets the artifact location of a newly created experiment (without it,
    MLflow's default for a sqlite store is ``./mlruns`` under the working directory).
    ``start_time`` (ms since the epoch; default now) places the run in the newest-first run list.
    """
    from mlflow.entities import Metric, Param, RunTag

    c = io.client(uri)
    resolved = io.resolve_tracking_uri(uri)
    with io._mlflow_errors(resolved):
        exp = c.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else c.create_experiment(experiment, artifact_location=artifact_root)
        run_id = c.create_run(exp_id, run_name=run_name, start_time=start_time).info.run_id
        ts = 1_700_000_000_000  # fixed timestamps keep re-logged fixtures deterministic
        metrics: list[Any] = []
        if history is not None:
            cols = (history["step"], history["metric"], history["value"])
            metrics += [Metric(m, float(v), ts + int(s), int(s)) for s, m, v in zip(*cols, strict=True)]
        if layer_df is not None and layer_history:
            cols = (layer_df["step"], layer_df["block"], layer_df["metric"], layer_df["value"])
            metrics += [
                Metric(io.block_key(m, int(b)), float(v), ts + int(s), int(s)) for s, b, m, v in zip(*cols, strict=True)
            ]
        str_params = [Param(k, str(v)) for k, v in (params or {}).items()]
        str_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        # log_batch limits: 1000 metrics, 100 params, 100 tags per call.
        for i in range(0, max(len(str_params), len(str_tags), 1), 100):
            c.log_batch(run_id, params=str_params[i : i + 100], tags=str_tags[i : i + 100])
        for i in range(0, len(metrics), 1000):
            c.log_batch(run_id, metrics=metrics[i : i + 1000])
        if layer_df is not None and layer_artifact:
            with tempfile.TemporaryDirectory(prefix="layerlock-") as tmp:
                path = Path(tmp) / io.LAYER_METRICS_ARTIFACT
                layer_df[["step", "block", "metric", "value"]].to_parquet(path, index=False)
                c.log_artifact(run_id, str(path))
        for name, payload in (json_artifacts or {}).items():
            c.log_dict(run_id, payload, name)
        c.set_terminated(run_id, status=status)
    return run_id
