"""``bench cli``: seconds for ``python -m analysis convergence --json`` on a synthetic run,
start-up included (median of repeats).
Timings are measured here, never asserted in tests: the machine decides them.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.bench.timing import timed


def bench_cli(repeats: int) -> dict[str, float]:
    """Median seconds of ``python -m analysis convergence --json`` on a synthetic 7-block run."""
    from analysis.testing import create_run_from_frames, synthetic_layer_metrics

    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        run_id = create_run_from_frames(
            "bench",
            uri=uri,
            artifact_root=(Path(tmp) / "artifacts").as_uri(),
            layer_df=synthetic_layer_metrics([120, 180, 260, None], total_steps=600),
        )
        command = [sys.executable, "-m", "analysis", "convergence", "--run", run_id, "--json", "--tracking-uri", uri]
        times = [
            timed(lambda: subprocess.run(command, cwd=root, check=True, capture_output=True, timeout=120))[0]
            for _ in range(repeats)
        ]
    return {"convergence_json_s": statistics.median(times)}
