"""Every bad input gets exit code 2, exactly one ``error:`` line on stderr and no traceback.

``ROWS`` is the table in README.md ("Bad input: what you get"): each row is a command and the
exact error line, with placeholders STORE (a sqlite tracking URI), RUN_ID (a finished tiny run
in it), DIR (a folder of bad files made here). ``test_readme_lists_every_row`` keeps the two in
step.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "experiments/configs/mae_tiny.yaml"
PRE = ["-m", "experiments", "pretrain", "--config", TINY]
PRES = [*PRE, "--tracking-uri", "STORE"]  # inputs found once training starts (a FAILED run is logged)
WITH = "experiments/configs/mae_tiny.yaml (with --set)"


def schedule(name: str) -> list[str]:
    return [*PRES, "--set", "objective.name=layerlock", "--set", f"freeze.schedule={name}"]


def videos(folder: str) -> list[str]:
    return [*PRES, "--set", "data.name=video_folder", "--set", f"data.root=DIR/{folder}"]


# (id, argv, the exact error line). Commands with STORE take it as --tracking-uri.
ROWS: list[tuple[str, list[str], str]] = [
    ("tag-without-equals", [*PRE, "--tag", "foo"], "--tag expects key=value, got 'foo'"),
    (
        "config-binary",
        ["-m", "experiments", "pretrain", "--config", "/bin/ls"],
        "/bin/ls: not a text file (a YAML config is UTF-8 text)",
    ),
    ("config-missing", ["-m", "experiments", "pretrain", "--config", "nope.yaml"], "config file not found: nope.yaml"),
    (
        "config-not-mapping",
        ["-m", "experiments", "pretrain", "--config", "DIR/list.yaml"],
        "DIR/list.yaml: the top level must be a mapping of sections",
    ),
    (
        "config-bad-yaml",
        ["-m", "experiments", "pretrain", "--config", "DIR/broken.yaml"],
        "DIR/broken.yaml: not valid YAML (while parsing a flow node)",
    ),
    (
        "seed-too-large",
        [*PRE, "--set", "train.seed=10000000000000000000000"],
        f"{WITH}: train.seed: Input should be less than or equal to 2147483647",
    ),
    (
        "mlp-ratio-inf",
        [*PRE, "--set", "model.mlp_ratio=.inf"],
        f"{WITH}: model.mlp_ratio: Input should be a finite number",
    ),
    (
        "latent-block-out-of-range",
        [*PRE, "--set", "objective.name=latent_naive", "--set", "objective.latent_block=99"],
        f"{WITH}: objective.latent_block=99 is not a block of the model (model.depth=8: 0..7, or -1..-8 counted "
        "from the last)",
    ),
    ("unknown-key", [*PRE, "--set", "model.depht=4"], f"{WITH}: unknown config key 'model.depht'"),
    (
        "not-an-integer",
        [*PRE, "--set", "train.steps=abc"],
        f"{WITH}: train.steps: Input should be a valid integer, unable to parse string as an integer",
    ),
    ("set-without-equals", [*PRE, "--set", "nokey"], "--set expects key=value, got 'nokey'"),
    (
        "heads-do-not-divide",
        [*PRE, "--set", "model.dim=30"],
        f"{WITH}: model: model.dim=30 is not divisible by model.heads=4",
    ),
    ("schedule-binary", schedule("/bin/ls"), "/bin/ls: not a text file (a schedule is JSON text)"),
    ("schedule-missing", schedule("DIR/missing.json"), "schedule file not found: DIR/missing.json"),
    ("schedule-not-json", schedule("DIR/notjson.json"), "DIR/notjson.json: not valid JSON (Expecting value at line 1)"),
    (
        "schedule-freezes-all",
        schedule("DIR/allfrozen.json"),
        "DIR/allfrozen.json: stages[0].frozen=8 leaves no block trainable (n_blocks=8; at most 7)",
    ),
    (
        "schedule-steps-decrease",
        schedule("DIR/decreasing.json"),
        "DIR/decreasing.json: stages[1].step=5 is not after stages[0].step=10 (steps must strictly increase)",
    ),
    ("schedule-wrong-depth", schedule("DIR/four_blocks.json"), "schedule is for n_blocks=4 but model.depth=8"),
    ("video-folder-missing", videos("nothere"), "video folder not found: DIR/nothere"),
    (
        "video-folder-empty",
        videos("novideos"),
        "no videos found in DIR/novideos: expected DIR/novideos/<class>/<video> with extensions mp4, avi, webm, gif, "
        "mkv, mov",
    ),
    ("video-folder-undecodable", videos("badvideos"), "none of the 1 videos in DIR/badvideos could be decoded"),
    (
        "uri-unreachable",
        [*PRE, "--tracking-uri", "http://127.0.0.1:9"],
        "tracking server http://127.0.0.1:9 does not answer (Connection refused)",
    ),
    (
        "uri-unknown-scheme",
        [*PRE, "--tracking-uri", "foo://bar"],
        "tracking URI foo://bar: unsupported scheme 'foo' (use sqlite:///FILE.db, http(s)://HOST:PORT or "
        "postgresql://...)",
    ),
    (
        "uri-sqlite-without-file",
        [*PRE, "--tracking-uri", "sqlite:///"],
        "tracking URI sqlite:///: no database file (sqlite:///FILE.db, or sqlite:////ABS/FILE.db)",
    ),
    (
        "uri-bad-port",
        ["-m", "analysis", "convergence", "--run", "RUN_ID", "--tracking-uri", "http://127.0.0.1:99999"],
        "tracking URI http://127.0.0.1:99999: Port out of range 0-65535",
    ),
    (
        "resume-unknown-run",
        ["-m", "experiments", "pretrain", "--resume", "0123456789abcdef", "--tracking-uri", "STORE"],
        "run not found: 0123456789abcdef (tracking URI STORE)",
    ),
    (
        "resume-with-set",
        ["-m", "experiments", "pretrain", "--resume", "RUN_ID", "--set", "train.steps=3"],
        "--resume continues a run with its own config: drop --config/--set",
    ),
    (
        "resume-live-run",
        ["-m", "experiments", "pretrain", "--resume", "LIVE_ID", "--tracking-uri", "STORE"],
        "run LIVE_ID is being trained by otherhost pid 4242 (heartbeat less than 120 s old); resume it once that "
        "process has stopped",
    ),
    (
        "sync-unknown-run",
        ["-m", "experiments", "sync", "0123456789abcdef", "--tracking-uri", "STORE"],
        "run not found: 0123456789abcdef (tracking URI STORE)",
    ),
    (
        "sync-unreachable",
        ["-m", "experiments", "sync", "--tracking-uri", "http://127.0.0.1:9"],
        "tracking server http://127.0.0.1:9 does not answer (Connection refused)",
    ),
    ("seeds-not-integers", [*PRE, "--seeds", "a,b"], "--seeds expects comma-separated integers, got 'a,b' ('a')"),
    ("seeds-repeated", [*PRE, "--seeds", "0,0"], "--seeds repeats 0: each seed gives one run"),
    (
        "evaluate-unknown-run",
        ["-m", "experiments", "evaluate", "--run", "0123456789abcdef", "--tracking-uri", "STORE"],
        "run not found: 0123456789abcdef (tracking URI STORE)",
    ),
    (
        "evaluate-unknown-task",
        ["-m", "experiments", "evaluate", "--run", "RUN_ID", "--tasks", "nonsense", "--tracking-uri", "STORE"],
        "unknown task 'nonsense'; this dataset has: digit, direction, depth",
    ),
    (
        "freeze-test-no-checkpoint",
        [
            "-m",
            "experiments",
            "freeze-test",
            "--baseline",
            "RUN_ID",
            "--steps",
            "7",
            "--blocks",
            "1",
            "--tracking-uri",
            "STORE",
        ],
        "run RUN_ID has no checkpoint at step 7 (has: 4, 8, 12)",
    ),
    (
        "freeze-test-too-many-blocks",
        [
            "-m",
            "experiments",
            "freeze-test",
            "--baseline",
            "RUN_ID",
            "--steps",
            "4",
            "--blocks",
            "9",
            "--tracking-uri",
            "STORE",
        ],
        "--blocks 9: must be between 1 and 3 (model.depth=4)",
    ),
    (
        "demo-threshold-above-1",
        ["-m", "experiments", "demo", "--threshold", "2", "--tracking-uri", "STORE"],
        "threshold=2.0 for the posthoc rule: a CKA similarity must be in (0, 1]",
    ),
    (
        "study-seeds",
        ["-m", "experiments", "study", "--seeds", "x", "--tracking-uri", "STORE"],
        "--seeds expects comma-separated integers, got 'x' ('x')",
    ),
    (
        "bench-zero-rounds",
        ["-m", "experiments", "bench", "freezing", "--rounds", "0"],
        "--rounds must be at least 1, got 0",
    ),
    (
        "bench-within",
        ["-m", "experiments", "bench", "tracking", "--within", "2"],
        "--within must be a fraction in (0, 1), got 2.0",
    ),
    (
        "bench-profile-frozen",
        ["-m", "experiments", "bench", "profile", "--frozen", "8"],
        "--frozen must be between 0 and 7 (model.depth=8), got 8",
    ),
    (
        "bench-monitor-every-zero",
        ["-m", "experiments", "bench", "monitor", "--every", "0"],
        "--every must be at least 1, got 0",
    ),
    (
        "own-loop-schedule-missing",
        ["-m", "experiments.examples.own_loop", "--schedule", "DIR/missing.json", "--tracking-uri", "STORE"],
        "schedule file not found: DIR/missing.json",
    ),
    (
        "own-loop-schedule-other-model",
        [
            "-m",
            "experiments.examples.own_loop",
            "--model",
            "video",
            "--schedule",
            "DIR/four_blocks.json",
            "--tracking-uri",
            "STORE",
        ],
        "DIR/four_blocks.json: the schedule is for 4 blocks, --model video has 5",
    ),
    (
        "convergence-unknown-run",
        ["-m", "analysis", "convergence", "--run", "0123456789abcdef", "--tracking-uri", "STORE"],
        "run not found: 0123456789abcdef (tracking URI STORE)",
    ),
    (
        "convergence-threshold-nan",
        ["-m", "analysis", "convergence", "--run", "RUN_ID", "--threshold", "nan", "--tracking-uri", "STORE"],
        "threshold must be a finite number, got nan",
    ),
    (
        "schedule-out-unwritable",
        ["-m", "analysis", "schedule", "--run", "RUN_ID", "--out", "/bin/ls/x.json", "--tracking-uri", "STORE"],
        "cannot write --out /bin/ls/x.json: /bin/ls is not a directory",
    ),
    (
        "compare-unknown-run",
        ["-m", "analysis", "compare", "nope1", "--tracking-uri", "STORE"],
        "not a run id or a layerlock.group name: nope1 (tracking URI STORE)",
    ),
    (
        "freeze-grid-no-children",
        ["-m", "analysis", "freeze-grid", "--parent", "RUN_ID", "--tracking-uri", "STORE"],
        "run RUN_ID has no freeze-test children (no runs tagged layerlock.parent=RUN_ID)",
    ),
]


def _cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, str]:
    """DIR with the bad files, STORE with one finished tiny run RUN_ID (4 blocks, checkpoints 4, 8, 12)
    and LIVE_ID, a RUNNING run whose owner on another host has a fresh heartbeat."""
    d = tmp_path_factory.mktemp("bad")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "broken.yaml").write_text("model: [\n")
    (d / "notjson.json").write_text("nope\n")
    (d / "allfrozen.json").write_text('{"n_blocks": 8, "stages": [{"step": 10, "frozen": 8}]}')
    (d / "decreasing.json").write_text(
        '{"n_blocks": 8, "stages": [{"step": 10, "frozen": 1}, {"step": 5, "frozen": 2}]}'
    )
    (d / "four_blocks.json").write_text('{"n_blocks": 4, "stages": []}')
    (d / "novideos" / "cls").mkdir(parents=True)
    (d / "badvideos" / "cls").mkdir(parents=True)
    (d / "badvideos" / "cls" / "x.mp4").write_bytes(bytes(range(256)) * 4)
    store = f"sqlite:///{d}/mlflow.db"
    tiny = {
        "model.depth": 4,
        "model.dim": 24,
        "model.heads": 2,
        "model.decoder_dim": 16,
        "model.decoder_heads": 2,
        "data.frames": 4,
        "data.size": 16,
        "data.train_clips": 64,
        "data.val_clips": 16,
        "probe.every": 4,
        "probe.batch_size": 8,
        "probe.tokens_per_clip": 4,
        "train.steps": 12,
        "train.batch_size": 4,
        "train.warmup_steps": 2,
        "train.checkpoint_every": 4,
        "train.log_every": 2,
        "train.heldout_clips": 8,
    }
    sets = [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
    proc = _cli([*PRE, *sets, "--tracking-uri", store], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from mlflow import MlflowClient

    from core.schema import TAG_HEARTBEAT, TAG_OWNER

    client = MlflowClient(store)
    # A heartbeat an hour ahead (a trainer whose clock runs fast) stays fresh for the whole module.
    live = client.create_run(
        client.get_experiment_by_name("layerlock").experiment_id,
        tags={TAG_OWNER: "otherhost pid 4242", TAG_HEARTBEAT: f"{time.time() + 3600:.0f}"},
    ).info.run_id
    return {"DIR": str(d), "STORE": store, "RUN_ID": proc.stdout.strip().splitlines()[-1], "LIVE_ID": live}


def _fill(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace(name, value)
    return text


ERROR_LINE = re.compile(r"^(?:[\w .-]+: )?error: ")  # ours, or argparse's "prog: error: "


@pytest.mark.system
@pytest.mark.parametrize("args, message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_gets_one_error_line_and_exit_2(bad, args, message):
    argv = [_fill(a, bad) for a in args]
    proc = _cli(argv, timeout=60)  # a bad input is refused within a minute, or the test fails here
    errors = [line for line in proc.stderr.splitlines() if ERROR_LINE.match(line)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors == [f"error: {_fill(message, bad)}"], proc.stderr[-2000:]


@pytest.mark.system
def test_unreachable_server_fails_within_15_seconds():
    proc = _cli([*PRE, "--tracking-uri", "http://127.0.0.1:9"], timeout=15)  # past it: TimeoutExpired, a failure
    assert proc.returncode == 2, proc.stderr[-2000:]


def readme_row(args: list[str], message: str) -> tuple[str, str]:
    """How a row reads in README.md: the command and the error line, in backticks."""
    return f"`python {' '.join(args)}`", f"`error: {message}`"


def test_readme_lists_every_row():
    readme = (ROOT / "README.md").read_text()
    for row_id, args, message in ROWS:
        command, error = readme_row(args, message)
        assert f"| {command} | {error} |" in readme, row_id
    assert len(ROWS) >= 25
