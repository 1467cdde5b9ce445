"""Helpers shared by several test files: tiny configs, the command line, the dashboard's store
and AppTest lookups, small real videos. Fixtures stay in ``conftest.py``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from analysis import io
from analysis.testing import (
    create_run_from_frames,
    synthetic_flop_model,
    synthetic_history,
    synthetic_layer_metrics,
    synthetic_time_model,
)

ROOT = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:  # pragma: no cover - streamlit loads only where a test opens a page
    from streamlit.testing.v1 import AppTest

HOME = str(ROOT / "app" / "Home.py")
TIMEOUT = 120  # AppTest's per-run limit: cold imports (torch, mlflow) on a shared 2-core CPU

# ----------------------------------------------------------------------------- tiny configs, command line

TINY = {
    "model": {"depth": 4, "dim": 24, "heads": 2, "decoder_dim": 16, "decoder_heads": 2, "patch_size": 8},
    "data": {"frames": 4, "size": 16, "train_clips": 64, "val_clips": 16},
    "probe": {"every": 4, "batch_size": 8, "tokens_per_clip": 4},
    "train": {"steps": 12, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 2},
}


def tiny_dict(**sections) -> dict:
    out = {k: dict(v) for k, v in TINY.items()}
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


def run_cli(*args: str, env: dict | None = None, timeout: int = 300):
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def tiny_sets(**overrides) -> list[str]:
    """The tiny config as ``--set`` arguments for the command line."""
    tree = tiny_dict()
    flat = {f"{sec}.{k}": v for sec, vals in tree.items() for k, v in vals.items()}
    flat.update(overrides)
    out: list[str] = []
    for k, v in flat.items():
        out += ["--set", f"{k}={v}"]
    return out


# ----------------------------------------------------------------------------- the dashboard's store


@dataclass(frozen=True)
class Store:
    uri: str
    real: str  # newest run, trained for real (tiny config), with checkpoints
    synthetic: str  # LayerLock run from analysis.testing (schedule, flop model, no checkpoints)
    failed: str
    bare: str  # run-level history only: no per-block metrics
    children: tuple[str, ...]


def build_store(folder: Path) -> Store:
    """Fill ``folder/mlflow.db``: synthetic runs first, then the real run (so it is the newest)."""
    from core.config import ExperimentConfig
    from core.train import train

    uri = f"sqlite:///{folder}/mlflow.db"
    root = (folder / "artifacts").as_uri()
    depth, steps = 4, 12
    # On the real tiny run's scale (about 3.6 MFLOP and 1.3 s per step), so charts compare sensibly.
    model = synthetic_flop_model(depth, block_forward=2e5, other=1.15e6, batch_size=4)
    schedule = {"n_blocks": depth, "stages": [{"step": 4, "frozen": 1}, {"step": 8, "frozen": 2}], "source": {}}
    params = {"model.depth": depth, "train.steps": steps, "probe.every": 4}
    common = {"uri": uri, "artifact_root": root, "params": params}
    layer_df = synthetic_layer_metrics([4, 8, None, None], total_steps=steps, probe_every=4, log_every=2)
    evals = pd.DataFrame({"step": steps, "metric": ["eval/digit/acc", "eval/direction/acc"], "value": [0.4, 0.9]})
    synthetic = create_run_from_frames(
        "layerlock",
        layer_df=layer_df,
        history=pd.concat([synthetic_history(steps, 2, model, schedule, seconds_per_flop=3.5e-7, seed=1), evals]),
        tags={io.TAG_METHOD: "layerlock", io.TAG_DATASET: "moving_digits"},
        run_name="synthetic-layerlock",
        json_artifacts={
            io.FLOP_MODEL_ARTIFACT: model,
            io.SCHEDULE_ARTIFACT: schedule,
            io.TIME_MODEL_ARTIFACT: synthetic_time_model(model, step_s=1.3, unshrinkable=0.3),
        },
        **common,
    )
    failed = create_run_from_frames(
        "layerlock",
        history=synthetic_history(steps, 2, seed=2).head(3),
        status="FAILED",
        run_name="diverged",
        tags={io.TAG_METHOD: "mae", io.TAG_FAILURE: "loss is nan at step 3"},
        **common,
    )
    bare = create_run_from_frames(
        "layerlock",
        history=synthetic_history(steps, 2, model, seconds_per_flop=3.5e-7, seed=3),
        run_name="no-probes",
        tags={io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits"},
        **common,
    )
    real = train(ExperimentConfig.model_validate(tiny_dict()), tracking_uri=uri, progress=False).run_id
    loss = io.load_history(real, ["train/loss"], uri)
    children = tuple(
        create_run_from_frames(
            "freeze-tests",
            history=loss.assign(value=loss["value"] * ratio),
            run_name=f"freeze-L{blocks}-T{at}",
            tags={
                io.TAG_METHOD: "freeze_test",
                io.TAG_PARENT: real,
                io.TAG_FREEZE_STEP: str(at),
                io.TAG_FREEZE_BLOCKS: str(blocks),
            },
            **common,
        )
        for blocks, at, ratio in ((1, 4, 1.0), (2, 4, 1.05), (1, 8, 1.01))
    )
    return Store(uri, real, synthetic, failed, bare, children)


# ----------------------------------------------------------------------------- AppTest


def point_app_at(uri: str, tmp_path: Path, monkeypatch) -> None:
    """Make the dashboard read ``uri`` and keep its launched jobs under ``tmp_path``."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LAYERLOCK_RUNS_DIR", str(tmp_path / "runs"))


def open_page(page: str, at: AppTest | None = None) -> AppTest:
    """``page`` rendered through Home.py's navigation (a new session unless ``at`` is given)."""
    from streamlit.testing.v1 import AppTest

    if at is None:
        at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
        at.run()
    at.switch_page(f"screens/{page}.py")
    at.run()
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def frame_with(at: AppTest, *columns: str):
    """The first dataframe shown with all of ``columns`` (display frames carry no key in AppTest)."""
    for df in at.dataframe:
        if set(columns) <= set(df.value.columns):
            return df.value
    raise AssertionError(f"no dataframe with columns {columns}")


# ----------------------------------------------------------------------------- videos


def write_video(
    path: Path, color: tuple[int, int, int], codec: str = "libx264", n: int = 10, w: int = 48, h: int = 40
) -> None:
    """Write a small real video: a solid colour with a bright bar that moves every frame."""
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height = w, h
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for t in range(n):
            img = np.empty((h, w, 3), dtype=np.uint8)
            img[:] = color
            img[:, 4 * t : 4 * t + 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def stop_process(proc, timeout: float = 20) -> None:
    """Terminate a child process (a dashboard server), killing it if it does not exit in time."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- a team tracking server


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeamServer:
    """README "Past one machine" on loopback: PostgreSQL on a throwaway data folder as the backend
    store, ``mlflow server`` with a local artifact root in front of it. ``kill()`` SIGKILLs the
    MLflow server (PostgreSQL stays), ``start_mlflow()`` brings it back on the same port."""

    def __init__(self) -> None:
        import glob
        import shutil
        import tempfile

        initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
        if not initdb[-1]:
            raise RuntimeError("PostgreSQL is not installed: `bash .ci/setup --browser` installs Debian's postgresql")
        self.bin = Path(initdb[-1]).parent
        self.folder = Path(tempfile.mkdtemp(prefix="layerlock-team-"))
        self.pg_port, self.port = free_port(), free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = f"postgresql://postgres@127.0.0.1:{self.pg_port}/mlflow"
        self.mlflow = None

    def _as_postgres(self, *cmd: str):
        """PostgreSQL refuses to run as root: as root, run its tools as the ``postgres`` user."""
        import subprocess

        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> TeamServer:
        if os.geteuid() == 0:
            import shutil

            shutil.chown(self.folder, "postgres")
        data = self.folder / "pg"
        self._as_postgres(str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        # fsync off: a throwaway database; unix socket in the data folder, TCP on loopback only.
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.folder / "pg.log"),
            "-w",
            "-o",
            f"-p {self.pg_port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        self._as_postgres(
            str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", "mlflow"
        )
        self.start_mlflow()
        return self

    def start_mlflow(self, timeout: float = 240) -> None:
        import subprocess
        import time
        import urllib.request

        log = open(self.folder / "mlflow.log", "ab")  # noqa: SIM115 - the child writes to it
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.mlflow = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                self.backend,
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.folder,
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.mlflow.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'mlflow.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server not up after {timeout} s")

    def kill(self) -> None:
        import signal

        if self.mlflow is not None and self.mlflow.poll() is None:
            os.killpg(self.mlflow.pid, signal.SIGKILL)  # its own session: the server and its workers
            self.mlflow.wait()
        self.mlflow = None

    def stop(self) -> None:
        import shutil
        import subprocess

        self.kill()
        try:
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.folder / "pg"), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------- runs of a user's own loop


@dataclass(frozen=True)
class OwnLoopStore:
    """Two runs of the README example's plain loop on torchvision models, with LayerMonitor attached."""

    folder: Path
    uri: str
    vit: str  # VisionTransformer, 300 steps
    video: str  # VideoResNet (mc3 layout), 200 steps
    steps: dict  # run id -> steps


OWN_LOOP_STEPS = {"vit": 300, "video": 200}
OWN_LOOP_EVERY = 20


def build_own_loop_store(folder: Path) -> OwnLoopStore:
    """Train both example models in ``folder/mlflow.db`` (one intra-op thread: on a shared 2-core
    machine, spinning OpenMP threads make these small steps ten times slower)."""
    import torch

    from experiments.examples.own_loop import SETUPS, attach_monitor, open_run, train

    uri = f"sqlite:///{folder}/mlflow.db"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = {}
        for name, steps in OWN_LOOP_STEPS.items():
            setup = SETUPS[name]()
            with (
                open_run(uri, f"{name}-own-loop") as writer,
                attach_monitor(setup, steps, OWN_LOOP_EVERY, writer=writer) as mon,
            ):
                train(setup, steps, monitor=mon)
            ids[name] = mon.run_id
    finally:
        torch.set_num_threads(threads)
    return OwnLoopStore(folder, uri, ids["vit"], ids["video"], {ids[n]: s for n, s in OWN_LOOP_STEPS.items()})


# ----------------------------------------------------------------------------- a demo's or study's runs, synthetic

BUNDLE_ROLES = {  # role (the run's name in a demo or study) -> its method tag
    "mae": "mae",
    "layerlock": "layerlock",
    "latent_scheduled": "latent_scheduled",
    "latent_naive": "latent_naive",
    "freeze_only": "mae",
}


@dataclass(frozen=True)
class BundleRuns:
    id: str
    runs: dict  # role -> run ids in seed order
    summary: str | None  # a study's summary run


def synthetic_study_results(study_id: str, runs: dict, seeds: list[int]) -> dict:
    """A ``results.json`` with every claim (S0-S4) as `experiments study` writes it, from made-up
    numbers (``analysis.claims`` estimates): what the Study page reads, without training."""
    from analysis.claims import claim, difference, estimate

    rng = np.random.default_rng(0)

    def near(x: float, sd: float = 0.02) -> list[float]:
        return [float(x + sd * rng.standard_normal()) for _ in seeds]

    rules = ("posthoc", "online", "gradnorm")
    s0 = {
        k: {**claim(near(0.2), 0.0, "above"), "mae": estimate(near(0.5)), "random_init": estimate(near(0.3))}
        for k in ("eval/digit/acc", "eval/digit/linear_acc")
    }
    s1 = {
        r: {**claim(near(0.8), 0.0, "above"), "metric": "cka_final", "threshold": 0.95, "undefined_seeds": 0}
        for r in rules
    }
    s1["posthoc"]["steps"] = {str(s): [4, 8, 8, 12] for s in seeds}
    s2 = {
        r: {
            "spearman": (sp := estimate(near(0.6))),
            "kendall": estimate(near(0.5)),
            "mean_abs_error": estimate(near(2.0)),
            "verdict": claim(sp["values"])["verdict"],
        }
        for r in rules
    }
    grid = {str(L): {str(T): 1.0 + 0.01 * L * (12 - T) / 4 for T in (4, 8)} for L in (1, 2)}
    cost = {
        "mean_ratio": grid,
        "early_deep": {"T": 4, "L": 2, **estimate(near(0.04, 0.005))},
        "late_deep": {"T": 8, "L": 2, **estimate(near(0.01, 0.005))},
        "tolerance": estimate(near(0.02, 0.002)),
    }
    s3 = {
        m: {
            "flop_saving": claim(near(0.3), 0.0, "above"),
            "wall_saving": claim(near(0.2), 0.0, "above"),
            "predicted_flop_saving": None,
            "probe_deltas": {"eval/digit/acc": difference(near(0.0))},
        }
        for m in ("freeze_only", "layerlock")
    }
    s4 = {m: {"feat_std_min": estimate(near(0.5)), "ratio_to_mae": claim(near(1.0), 0.5, "above")} for m in runs}
    return {
        "study_id": study_id,
        "budget": "small",
        "seeds": list(seeds),
        "interval": "95% t interval over seeds (Student's t, N-1 degrees of freedom)",
        "claims": {
            "S0_pretraining_matters": {"claim": "MAE beats random init", "figure": "MAE - random init", "metrics": s0},
            "S1_depth_order": {
                "claim": "shallow first",
                "figure": "rho",
                "rules": s1,
                "verdict": s1["posthoc"]["verdict"],
            },
            "S2_cheap_rules_vs_freeze_test": {
                "claim": "rules agree",
                "figure": "rho",
                "rules": s2,
                "freeze_cost": cost,
            },
            "S3_compute": {"claim": "freezing saves compute", "figure": "saving", "methods": s3},
            "S4_collapse": {"claim": "naive collapses", "figure": "feat_std", "methods": s4},
        },
        "runs": {m: {str(s): r for s, r in zip(seeds, ids, strict=True)} for m, ids in runs.items()},
        "freeze_test_children": {},
        "figures": [],
    }


def add_bundle_runs(
    uri: str,
    folder: Path,
    bundle_id: str,
    seeds: list[int],
    start_time: int,
    roles: tuple[str, ...] = ("mae", "layerlock", "latent_scheduled", "latent_naive", "freeze_only"),
    study: bool = False,
) -> BundleRuns:
    """Synthetic runs tagged as `experiments demo` (``bundle_id`` "demo-...") or `experiments study`
    (``study``: plus its summary run with a ``results.json``) tag theirs: group ``<id>-<role>``, run
    name ``<role>``; started from ``start_time`` (ms) on, one ms apart, MAE first."""
    depth, steps = 4, 12
    common = {"uri": uri, "artifact_root": (folder / "artifacts").as_uri()}
    layer_df = synthetic_layer_metrics([4, 8, None, None], total_steps=steps, probe_every=4, log_every=2)
    runs: dict[str, list[str]] = {}
    t = start_time
    for role in roles:
        for seed in seeds:
            tags = {
                io.TAG_METHOD: BUNDLE_ROLES[role],
                io.TAG_DATASET: "moving_digits",
                io.TAG_GROUP: f"{bundle_id}-{role}",
            }
            if study:
                tags["layerlock.study"] = bundle_id
            runs.setdefault(role, []).append(
                create_run_from_frames(
                    "layerlock-study" if study else "layerlock-demo",
                    history=synthetic_history(steps, 2, loss_start=1.0 + 0.1 * seed, seed=seed),
                    layer_df=layer_df,
                    run_name=role,
                    params={"train.seed": seed, "train.steps": steps, "model.depth": depth, "objective.name": role},
                    tags=tags,
                    start_time=t,
                    **common,
                )
            )
            t += 1
    summary = None
    if study:
        results = synthetic_study_results(bundle_id, runs, seeds)
        summary = create_run_from_frames(
            "layerlock-study",
            params={"seeds": ",".join(map(str, seeds)), "budget": "small"},
            run_name=bundle_id,
            tags={io.TAG_METHOD: "study", "layerlock.study": bundle_id},
            json_artifacts={"study/results.json": results},
            start_time=t,
            **common,
        )
        from mlflow import MlflowClient

        MlflowClient(uri).log_text(summary, f"# LayerLock Lab study {bundle_id}\n", "study/report.md")
    return BundleRuns(bundle_id, runs, summary)
