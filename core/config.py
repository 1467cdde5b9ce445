"""Typed experiment configuration loaded from YAML with ``--set dotted.key=value`` overrides.

One pydantic model per concern (model, data, objective, freeze, probe, train, tracking),
combined into :class:`ExperimentConfig`. Every model forbids unknown keys, so a mistyped key
is an error naming the key and the file instead of being silently ignored.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ConfigError, first_line, read_user_file

# Seeds feed torch generators (a 64-bit range, after core.train.step_generator's arithmetic).
MAX_SEED = 2**31 - 1


class _Strict(BaseModel):
    # No inf/NaN anywhere: an infinite mlp_ratio or lr is never meant and fails deep inside torch.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    depth: int = Field(8, ge=2, description="encoder blocks; freezing acts on a prefix of them")
    dim: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    patch_size: int = Field(8, ge=1, description="spatial side of a tubelet")
    tubelet: int = Field(2, ge=1, description="frames per tubelet")
    decoder_dim: int = Field(48, ge=8)
    decoder_depth: int = Field(1, ge=1)
    decoder_heads: int = Field(4, ge=1)
    pos: Literal["sincos", "rope"] = "sincos"
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="fraction of tubes hidden (tube masking)")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"model.decoder_dim={self.decoder_dim} is not divisible by model.decoder_heads={self.decoder_heads}"
            )
        return self


class DataConfig(_Strict):
    name: Literal["moving_digits", "photo_pans", "video_folder"] = "moving_digits"
    root: str | None = Field(None, description="folder root/<class>/*.mp4 for video_folder")
    frames: int = Field(8, ge=1)
    size: int = Field(32, ge=8, description="square frame side in pixels")
    train_clips: int = Field(4096, ge=8, description="virtual size of the procedural train split")
    val_clips: int = Field(512, ge=8, description="size of the held-out split used by probes")
    digits: int = Field(1, ge=1, le=4, description="moving_digits: digits per clip; labels are the nearest one's")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="data seed; the train/val splits are fixed by it")


class ObjectiveConfig(_Strict):
    # latent_scheduled: layerlock's target schedule (block k-1 at stage k of freeze.schedule) with
    # nothing frozen -- the ablation that isolates what freezing does against collapse.
    name: Literal["pixel", "layerlock", "latent_naive", "latent_scheduled"] = "pixel"
    pixel_weight: float = Field(1.0, ge=0)
    latent_weight: float = Field(1.0, ge=0, description="weight of the latent loss (every objective but pixel)")
    norm_pix_loss: bool = Field(True, description="normalise pixel targets per patch (MAE default)")
    latent_block: int = Field(-1, description="latent_naive: which block's output is the target (-1: last)")


class Stage(_Strict):
    step: int = Field(ge=0)
    frozen: int = Field(ge=0)


class LinearSchedule(_Strict):
    """Freeze one more block at evenly spaced steps between two fractions of the run."""

    kind: Literal["linear"] = "linear"
    start: float = Field(0.25, ge=0, le=1, description="fraction of train.steps of the first freeze")
    end: float = Field(0.75, ge=0, le=1, description="fraction of train.steps of the last freeze")
    final_frozen: float = Field(0.75, gt=0, description="blocks frozen at the end: a fraction (<1) or a count")


class FrozenSetSpec(_Strict):
    """A fixed frozen set from ``step`` on: exactly ``blocks`` (any blocks, not only a prefix) and the
    stem when ``stem``. What the freeze test's variants train with (a diagnostic, not a schedule)."""

    step: int = Field(ge=0, description="first step the set is frozen")
    blocks: list[int] = Field(default_factory=list, description="encoder blocks frozen (any indices)")
    stem: bool = Field(False, description="freeze the stem (patch embedding and position table) too")


class FreezeConfig(_Strict):
    schedule: str | list[Stage] | LinearSchedule | None = Field(
        None, description="path to a schedule JSON, an inline list of stages, or a linear generator"
    )
    stem: Literal["with_first", "last", "never"] | None = Field(
        None,
        description="when the stem (patch embedding, position table) freezes: with block 0 (the default), "
        "at the schedule's last stage, or never (then gradients flow through every frozen block to it, "
        "so no backward below the stem is saved); None: the schedule JSON's own 'stem' field",
    )
    only: FrozenSetSpec | None = Field(
        None, description="freeze exactly this set from its step on (freeze-test variants); excludes schedule"
    )

    @model_validator(mode="after")
    def _one_mechanism(self) -> FreezeConfig:
        if self.only is not None and self.schedule is not None:
            raise ValueError("freeze.only and freeze.schedule exclude each other")
        if self.only is not None and self.stem is not None:
            raise ValueError("freeze.only says itself whether the stem freezes (freeze.only.stem): drop freeze.stem")
        return self


class ProbeConfig(_Strict):
    enabled: bool = True
    every: int = Field(50, ge=1, description="probe interval in steps")
    # 32 clips x 32 positions = 1024 CKA rows per block: unrelated 128-dim features read 0.004 +- 0.002
    # (debiased; biased 0.11, ~dim / rows), while one probe stores 2 MiB on mae_tiny (core.probes).
    batch_size: int = Field(32, ge=4, description="clips in the fixed probe batch (its forward is the probe's cost)")
    tokens_per_clip: int = Field(
        32,
        ge=1,
        description="token positions read in every probe clip, the same for "
        "all clips (all tokens if a clip has fewer); bounds storage",
    )
    # Debiased by default: on real mae_tiny features it moves CKA by <= 0.002, while it removes the
    # biased estimator's ~0.11 floor for unrelated features at 1024 rows x 128 dims (README, Probes).
    debiased: bool = Field(True, description="unbiased HSIC estimator (Nguyen et al. 2021); false: biased CKA")


class TrainConfig(_Strict):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1.5e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(20, ge=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    compile: bool = Field(False, description="torch.compile the model (GPU)")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    heldout_clips: int = Field(
        256,
        ge=0,
        description="val clips of the held-out pixel loss logged at the end "
        "(val/loss_pixel; fixed clips and masks); 0 disables",
    )
    # Measuring is not training: the steps run on a copy of the model and change nothing it learns.
    time_calibration: int = Field(
        5,
        ge=0,
        le=100,
        description="timed steps per schedule stage before the first step, for time_model.json; 0 disables",
    )


class TrackingConfig(_Strict):
    experiment: str = "layerlock"
    run_name: str | None = None


class ExperimentConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _geometry_fits(self) -> ExperimentConfig:
        m, d = self.model, self.data
        if d.size % m.patch_size:
            raise ValueError(f"data.size={d.size} is not divisible by model.patch_size={m.patch_size}")
        if d.frames % m.tubelet:
            raise ValueError(f"data.frames={d.frames} is not divisible by model.tubelet={m.tubelet}")
        if d.name == "video_folder" and not d.root:
            raise ValueError("data.root is required for data.name=video_folder")
        lb = self.objective.latent_block
        if not -m.depth <= lb < m.depth:
            raise ValueError(
                f"objective.latent_block={lb} is not a block of the model (model.depth={m.depth}: "
                f"0..{m.depth - 1}, or -1..-{m.depth} counted from the last)"
            )
        return self

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_config(self)


@dataclass(frozen=True)
class Geometry:
    """Token grid derived once from the config; nothing else hard-codes tubelet sizes."""

    channels: int
    frames: int
    size: int
    tubelet: int
    patch: int

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Geometry:
        return cls(
            channels=3,
            frames=cfg.data.frames,
            size=cfg.data.size,
            tubelet=cfg.model.tubelet,
            patch=cfg.model.patch_size,
        )

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) tokens along time, height, width."""
        return self.frames // self.tubelet, self.size // self.patch, self.size // self.patch

    @property
    def n_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Pixel values in one tubelet: tubelet * patch * patch * channels."""
        return self.tubelet * self.patch * self.patch * self.channels


# ----------------------------------------------------------------------------- loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["train.steps=300", ...]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{loc}'"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{source}: {loc + ': ' if loc else ''}{msg}"


def config_from_dict(tree: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config, apply ``key=value`` overrides, validate. Raises ConfigError."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        text = read_user_file(p, "config", "a YAML config is UTF-8 text", ConfigError)
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({first_line(err)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
        source += " (with --set)"
    return config_from_dict(tree, source)


def with_overrides(cfg: ExperimentConfig, overrides: list[str], source: str = "config") -> ExperimentConfig:
    """``cfg`` with ``key=value`` overrides applied (the ``--set`` syntax), validated. Raises ConfigError."""
    return config_from_dict(_merge(cfg.model_dump(mode="json"), parse_overrides(overrides)), f"{source} (with --set)")


def flatten(cfg: ExperimentConfig) -> dict[str, str]:
    """Dotted-key view for MLflow params (values stringified, long lists summarised)."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            s = str(node)
            out[prefix] = s if len(s) <= 500 else s[:497] + "..."

    walk("", cfg.model_dump(mode="json"))
    return out


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def group_name(cfg: ExperimentConfig) -> str:
    """A stable, readable name for "this config minus the seed": runs that differ only in
    ``train.seed`` (and their display name ``tracking.run_name``) share it.

    ``<objective>-<dataset>-<8 hex chars>``, the hex being the SHA-1 of the resolved config as
    sorted JSON with those two keys (and ``train.time_calibration``) removed. Logged as the ``layerlock.group`` tag.
    """
    tree = cfg.model_dump(mode="json")
    tree["train"].pop("seed", None)
    tree["tracking"].pop("run_name", None)
    tree["train"].pop("time_calibration", None)  # measures the run, changes nothing it learns
    digest = hashlib.sha1(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]
    return f"{cfg.objective.name}-{cfg.data.name}-{digest}"
