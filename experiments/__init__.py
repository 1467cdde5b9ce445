"""Command-line entry points (``python -m experiments``, the ``layerlock`` command) and the packaged configs."""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"


def config_path(path: str | Path) -> Path:
    """The config file ``path`` names: as given when it exists; else, for a relative path whose file
    name is a packaged config (``experiments/configs/mae_tiny.yaml`` or ``mae_tiny.yaml``), the
    packaged one, so the README's commands work from any working directory. Otherwise ``path``
    unchanged (``load_config`` reports it missing)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    packaged = CONFIGS / p.name
    return packaged if packaged.is_file() else p
