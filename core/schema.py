"""The run schema: every tag, metric key and artifact name a run carries, defined once.

The trainer, the freeze test, the demo and the study write these names; ``analysis`` and the
dashboard read them. Nothing else spells them out (docs/architecture.md, "Run schema", has the
table). Also here: what each logged indicator measures, and what would fool it, one line each
(:data:`METRIC_HELP`); the dashboard, the command lines and the README show these lines next to
the numbers. Plain Python, no torch: the dashboard imports it (through ``analysis``).
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- tags

TAG_METHOD = "layerlock.method"  # mae, layerlock, latent_naive, latent_scheduled, freeze_test, study, own_loop
TAG_DATASET = "layerlock.dataset"
TAG_SCHEDULE_SOURCE = "layerlock.schedule_source"  # run id a schedule came from
TAG_PARENT = "layerlock.parent"  # freeze-test children, next to mlflow's own parent tag
MLFLOW_PARENT = "mlflow.parentRunId"
TAG_FREEZE_STEP = "layerlock.freeze_test.step"
TAG_FREEZE_BLOCKS = "layerlock.freeze_test.blocks"  # L (prefix variants), i (block), 0 (stem)
# Which freeze-test variant a child is (FREEZE_VARIANTS); children without it are "prefix".
TAG_FREEZE_VARIANT = "layerlock.freeze_test.variant"
# Freeze-test variants: prefix = blocks 0..L-1 with the stem (the paper's test), prefix-no-stem =
# blocks 0..L-1 with the stem trainable (a diagnostic: no saving), stem = the stem alone,
# block = block i alone (the blocks below train).
VARIANT_PREFIX, VARIANT_PREFIX_NO_STEM, VARIANT_STEM, VARIANT_BLOCK = "prefix", "prefix-no-stem", "stem", "block"
FREEZE_VARIANTS = (VARIANT_PREFIX, VARIANT_STEM, VARIANT_PREFIX_NO_STEM, VARIANT_BLOCK)
# When the stem (patch embedding, position table: what runs before block 0) freezes under a schedule:
# freeze.stem in the config, the optional top-level "stem" of a schedule JSON (absent = with_first).
STEM_WITH_FIRST, STEM_LAST, STEM_NEVER = "with_first", "last", "never"
STEM_POLICIES = (STEM_WITH_FIRST, STEM_LAST, STEM_NEVER)
TAG_FAILURE = "layerlock.failure_reason"  # FAILED runs: the first line of the error
TAG_GROUP = "layerlock.group"  # runs with equal values differ only in train.seed
TAG_STUDY = "layerlock.study"  # every run of one `python -m experiments study`
TAG_LAUNCHED_FROM = "layerlock.launched_from"  # "dashboard" for runs its Launch page started
TAG_JOB = "layerlock.job_id"  # the Launch page's job id: how it finds the run it started
# What makes a run of a set (experiments.executor) that run: its identifying tags (and seed) as one
# string, so a re-run of the command finds the runs already FINISHED and trains only the others.
TAG_RUN_KEY = "layerlock.run_key"
# The process training a run: "HOST pid PID", and its heartbeat (unix seconds, refreshed while it
# trains). A second trainer of a RUNNING run is refused while the heartbeat is fresh.
TAG_OWNER = "layerlock.owner"
TAG_HEARTBEAT = "layerlock.heartbeat"
# How many processes (DDP ranks, torchrun) trained the run, from its start; absent: one.
TAG_WORLD_SIZE = "layerlock.world_size"

# Values of TAG_METHOD that are not training objectives.
METHOD_FREEZE_TEST = "freeze_test"
METHOD_STUDY = "study"  # the summary run of a study
METHOD_OWN_LOOP = "own_loop"  # a run of the user's own training loop, logged by core.monitor.LayerMonitor

# ----------------------------------------------------------------------------- metric keys

TRAIN = "train/"  # run-level training metrics, logged every log_every steps
EVAL = "eval/"  # probes: eval/<task>/<metric>, eval/<task>/block_03/<metric>
STUDY = "study/"  # headline numbers of a study's summary run
LOSS = "train/loss"
LOSS_PIXEL = "train/loss_pixel"
LOSS_LATENT = "train/loss_latent"
LR = "train/lr"
FROZEN_BLOCKS = "train/frozen_blocks"
STEP_MS = "train/step_ms"
CLIPS_PER_S = "train/clips_per_s"
FLOPS = "train/flops"  # cumulative
WALL_S = "train/wall_s"  # cumulative
CPU_S = "train/cpu_s"  # cumulative CPU time of the process (all threads) over the same steps
SKIPPED_STEPS = "train/skipped_steps"
SKIPPED_FILES = "data/skipped_files"
# Held-out pixel loss logged once at the end of a run: fixed val clips, fixed masks (the freeze
# test's and the comparisons' "final loss" when present).
HELDOUT_KEY = "val/loss_pixel"

# Per-block metrics, logged as ``<metric>/block_NN`` (see :func:`block_key`).
BLOCK_METRICS = ("cka_prev", "cka_init", "cka_final", "grad_norm", "update_ratio", "eff_rank", "feat_std")


def block_key(metric: str, block: int) -> str:
    """``("cka_prev", 3)`` -> ``"cka_prev/block_03"``."""
    return f"{metric}/block_{block:02d}"


# ----------------------------------------------------------------------------- artifacts

CONFIG_ARTIFACT = "config.yaml"  # the resolved config
SCHEDULE_ARTIFACT = "schedule.json"  # the schedule the run trained with
# A schedule *derived* from a run. Deliberately not ``schedule.json``: that name means "the
# schedule this run trained with", and an MAE run that merely served as the source of a
# schedule must not look as if it had been trained with one.
DERIVED_SCHEDULE_ARTIFACT = "derived_schedule.json"
FLOP_MODEL_ARTIFACT = "flop_model.json"  # counted FLOPs of one step per frozen-prefix length
TIME_MODEL_ARTIFACT = "time_model.json"  # measured step time per frozen-prefix length (core.timemodel)
LAYER_METRICS_ARTIFACT = "layer_metrics.parquet"  # tidy: step, block, metric, value
PROBE_DIR = "probe"  # stored probe features: probe/step_NNNNNN.pt, one probe each
CHECKPOINT_DIR = "checkpoints"  # checkpoints/step_NNNNNN.pt
STUDY_DIR = "study"  # a study's report.md, results.json, figures/


def checkpoint_artifact(step: int) -> str:
    """``1200`` -> ``"checkpoints/step_001200.pt"`` (sorts by step as text)."""
    return f"{CHECKPOINT_DIR}/step_{step:06d}.pt"


def probe_artifact(step: int) -> str:
    """``100`` -> ``"probe/step_000100.pt"``: the features of the probe at that step."""
    return f"{PROBE_DIR}/step_{step:06d}.pt"


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint artifact path (inverse of :func:`checkpoint_artifact`)."""
    return int(name.rsplit("_", 1)[-1].removesuffix(".pt"))


# ----------------------------------------------------------------------------- what each metric means

METRIC_HELP: dict[str, str] = {
    "cka_prev": "debiased linear CKA of a block's content features (each position's mean over the probe clips "
    "removed) with the previous probe; fooled by a slowly drifting block whose every step is small",
    "cka_init": "debiased linear CKA of a block's content features with step 0 (how far it moved from init; "
    "0 = unrelated); fooled by large rotations of a few directions that CKA down-weights",
    "cka_final": "debiased linear CKA of a block's content features with the last probe (post-hoc: has it "
    "reached its end state?); fooled by an LR schedule that stops every block at once",
    "grad_norm": "L2 norm of a block's gradient at a log step; fooled by the LR schedule and by loss scale, "
    "not by what the block computes",
    "update_ratio": "||weight change|| / ||weights|| of one optimizer step; tracks the LR schedule as much "
    "as convergence",
    "eff_rank": "entropy effective rank of content features (each position's mean over the probe clips "
    "removed); fooled by a few large noise directions",
    "feat_std": "spread across clips, at each fixed token position, of layer-normalised features, averaged over "
    "positions and dims (~0: position-only or collapsed); low also on mostly blank clips, so compare "
    "runs on the same data",
    "train/loss": "training loss (pixel + weighted latent) averaged over the log interval",
    "train/loss_pixel": "masked-patch pixel MSE with per-patch normalised targets",
    "train/loss_latent": "masked-token MSE to a block's layer-normalised output (layerlock, latent_scheduled, "
    "latent_naive); near 0 can mean collapse, not success",
    "val/loss_pixel": "masked-patch pixel loss at the end of training on fixed held-out clips with fixed masks "
    "(the same for every run of a dataset); fooled by nothing batch-related, only by a different "
    "val split",
    "train/flops": "cumulative counted FLOPs of the training steps (FlopCounterMode, forward + backward)",
    "train/wall_s": "cumulative wall time of training steps (excludes checkpoint I/O)",
    "train/cpu_s": "cumulative CPU time of the process (all its threads) over the training steps; unlike wall "
    "time, not inflated by other jobs sharing the CPU, so runs made at different loads compare",
    "train/frozen_blocks": "length of the frozen prefix of encoder blocks (0 throughout for latent_scheduled, "
    "which follows the schedule's target depth only)",
}


def metric_help(key: str) -> str:
    """The one-line description of a metric key (``cka_prev/block_03`` -> the ``cka_prev`` line)."""
    base = key.split("/block_")[0]
    return METRIC_HELP.get(base, "")
