"""Reading a stored run's own files: its artifacts in the store and its local folder. Nothing
here writes (evaluation and checkpoint lookups of finished runs; a resume's checkpoint)."""

from __future__ import annotations

from pathlib import Path

from core.schema import CHECKPOINT_DIR
from core.tracking import store
from core.tracking.folders import FILES_DIR, local_checkpoints, local_dir
from core.tracking.uri import resolve_uri


class RunReader:
    """A run's artifacts (``list_artifacts``, ``download``) and its local copies (``folder``:
    the run's local folder, None when it has none)."""

    def __init__(self, client, run_id: str, folder: Path | None) -> None:
        self.client, self.run_id, self.folder = client, run_id, folder

    @classmethod
    def open(cls, run_id: str, uri: str | None = None) -> RunReader:
        """The reader of stored run ``run_id``; RunNotFoundError when the store has none."""
        uri = resolve_uri(uri)
        client = store.open_client(uri)
        store.existing_run(client, run_id, uri)
        return cls(client, run_id, local_dir(run_id) if local_dir(run_id).is_dir() else None)

    def list_artifacts(self, path: str | None = None) -> list[str]:
        """The stored artifacts under ``path``; none when the store cannot list them."""
        try:
            return [f.path for f in self.client.list_artifacts(self.run_id, path)]
        except Exception:
            return []

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))

    def local_file(self, name: str) -> Path | None:
        """The local copy of the artifact ``name`` (``Tracker.log_file``), if there is one."""
        if self.folder is None:
            return None
        p = self.folder / FILES_DIR / name
        return p if p.is_file() else None

    def checkpoints(self) -> tuple[list[str], dict[str, Path]]:
        """The run's checkpoint names (stored or only local) and its local checkpoint files."""
        local = local_checkpoints(self.folder)
        return sorted(set(self.list_artifacts(CHECKPOINT_DIR)) | set(local)), local
