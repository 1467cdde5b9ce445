"""Exceptions for bad user input.

Library code raises these; only the command-line layer (``experiments``/``analysis`` mains)
turns them into one line on stderr and exit code 2.
"""

from pathlib import Path


class LayerLockError(Exception):
    """Base class: an input the user can fix (config, schedule, path, run id, data)."""


class ConfigError(LayerLockError):
    """A config file or override is invalid (unknown key, bad value, missing file)."""


class DataError(LayerLockError):
    """A dataset cannot be built (unknown name, empty or missing folder, no readable video)."""


class ScheduleError(LayerLockError):
    """A freezing schedule is invalid."""


class RunNotFoundError(LayerLockError):
    """An MLflow run id does not exist in the tracking store."""


class TrainingDiverged(RuntimeError):
    """Loss became NaN or inf; the run is marked FAILED with a reason tag."""


class RunTerminated(RuntimeError):
    """SIGTERM stopped training: metrics flushed, a checkpoint written, the run marked KILLED."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (MLflow's ``.message`` when it has one),
    else the exception's class name: what a user sees on one line of stderr or in a warning.
    Never raises, also for an empty message."""
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def read_user_file(path: str | Path, name: str, content: str, error: type[LayerLockError]) -> str:
    """The UTF-8 text of a file the user named (a config, a schedule), or ``error`` with one line:
    ``{name} file not found``, ``not a text file ({content})`` or ``cannot be read``."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{name} file not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{p}: not a text file ({content})") from None
    except OSError as err:
        raise error(f"{p}: cannot be read ({err.strerror})") from None
