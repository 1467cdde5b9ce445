"""Tracking URIs: which store a command talks to, and a fast failure for one that cannot work."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from core.errors import LayerLockError

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow's own HTTP defaults (7 retries with exponential back-off from 2 s, 120 s per request)
# keep a command waiting minutes on a server that is not there; these apply unless the user set
# them. A refused connection then costs about 15 s (back-off 1, 2, 4, 8 s) before the trainer's
# spool takes over.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
CONNECT_TIMEOUT_S = 5.0
KNOWN_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306}


def resolve_uri(uri: str | None = None) -> str:
    """Flag, else ``MLFLOW_TRACKING_URI``, else the embedded sqlite store in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    """The file behind a ``sqlite:///`` URI (relative ``sqlite:///x.db``, absolute
    ``sqlite:////abs/x.db``; a ``?query`` is dropped), else None (other stores, ``:memory:``).

    The one parser of sqlite URIs (the trainer, ``analysis.io``, the dashboard).
    """
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative sqlite file made absolute (the same store from any directory)."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    _, sep, query = uri.partition("?")
    return f"sqlite:///{path.resolve()}{sep}{query}"


def _address(uri: str) -> tuple[str, int] | None:
    """``(host, port)`` of a networked store (http(s), postgresql, mysql), else None."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.hostname, parts.port or _DEFAULT_PORTS[scheme]


def answers(uri: str, timeout: float = 2.0) -> bool:
    """Whether a networked store accepts a TCP connection (always True for files)."""
    try:
        address = _address(uri)
    except ValueError:
        return False
    if address is None:
        return True
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError:
        return False
    return True


def check_uri(uri: str) -> None:
    """Bad tracking URIs fail at once with LayerLockError: an unknown scheme, a sqlite URI without
    a file, an ``http(s)://`` server that does not answer a TCP connect within CONNECT_TIMEOUT_S
    (instead of minutes of MLflow retries). For http(s), MLflow's HTTP retries and timeouts are
    bounded (HTTP_ENV_DEFAULTS) unless the user set them."""
    parts = urlsplit(uri)
    if "://" in uri and parts.scheme.split("+")[0] not in KNOWN_SCHEMES:
        raise LayerLockError(
            f"tracking URI {uri}: unsupported scheme '{parts.scheme}' "
            f"(use sqlite:///FILE.db, http(s)://HOST:PORT or postgresql://...)"
        )
    if parts.scheme == "sqlite" and not uri.removeprefix("sqlite:///").split("?", 1)[0]:
        raise LayerLockError(f"tracking URI {uri}: no database file (sqlite:///FILE.db, or sqlite:////ABS/FILE.db)")
    if parts.scheme not in ("http", "https"):
        return
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:  # a port that is not a number or out of range
        raise LayerLockError(f"tracking URI {uri}: {err}") from None
    if not host:
        raise LayerLockError(f"tracking URI {uri}: no host")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise LayerLockError(f"tracking server {uri} does not answer ({reason})") from None
