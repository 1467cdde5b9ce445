"""End to end in a real browser: `streamlit run app/Home.py` against a temporary store filled by a
short real run, every page loaded in headless Debian chromium (Playwright), no error text on any
page, one screenshot per page in test-artifacts/screenshots/; then the Convergence and Schedule
pages on the two runs of the README's own-loop example (torchvision ViT and video ResNet). With
``LAYERLOCK_DOCS_SCREENSHOTS=1`` the Convergence, Schedule and Compare shots also replace the
README's ``docs/images/*.png``. A second, synthetic store holds a demo's runs (tagged as `experiments
demo` tags them, the newest) and an older two-seed study: the pages' openings, the Study page
(``docs/images/study.png``) and a CSV download parsed back.

Chromium is required, not optional: CI installs it (`apt-get install -y chromium`); without it
this test fails with a message saying so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import (  # the same store as the AppTest suite
    BundleRuns,
    OwnLoopStore,
    Store,
    add_bundle_runs,
    build_store,
    stop_process,
)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SHOTS = ROOT / "test-artifacts" / "screenshots"
DOC_IMAGES, DOC_PAGES = ROOT / "docs" / "images", ("convergence", "schedule", "compare")
# page name -> (URL path, needs a Plotly chart once rendered)
PAGES = {
    "runs": ("", True),
    "convergence": ("convergence", True),
    "schedule": ("schedule", True),
    "compare": ("compare", True),
    "launch": ("launch", False),
    "freeze_test": ("freeze_test", True),
    "attribution": ("attribution", True),
    "study": ("study", False),
}
ERROR_TEXT = ("Traceback", "Error", "Exception")
pytestmark = [
    pytest.mark.system,  # a Streamlit server and a browser
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(own_loop_store: OwnLoopStore) -> Store:
    # Built beside the own-loop example's two runs (in their store; its real run is the newest).
    folder = own_loop_store.folder
    built = build_store(folder)
    # Plus a group of two seeds, older than every other run (so the single-run pages keep the real
    # run as their default): the Compare page offers it by default and draws its band.
    from analysis import io
    from analysis.testing import create_run_from_frames, synthetic_history

    for seed in (0, 1):
        create_run_from_frames(
            "layerlock",
            uri=built.uri,
            artifact_root=(folder / "artifacts").as_uri(),
            run_name=f"mae-seed{seed}",
            history=synthetic_history(12, 2, loss_start=1.0 + 0.2 * seed, seed=seed),
            start_time=1_600_000_000_000 + seed,
            params={"train.seed": seed, "train.steps": 12},
            tags={io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits", io.TAG_GROUP: "pixel-moving_digits-e2e00000"},
        )
    return built


@pytest.fixture(scope="module")
def server(store: Store, tmp_path_factory: pytest.TempPathFactory):
    """`streamlit run app/Home.py` on a free port against the store; yields its base URL."""
    yield from _serve(store.uri, tmp_path_factory)


def _serve(uri: str, tmp_path_factory: pytest.TempPathFactory):
    port = _free_port()
    log = tmp_path_factory.mktemp("e2e-server") / "streamlit.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "LAYERLOCK_RUNS_DIR": str(tmp_path_factory.mktemp("e2e-runs")),
    }
    argv = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "app/Home.py",
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.address",
        "127.0.0.1",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"streamlit did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process(proc, timeout=10)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]  # a page error would be logged here too


def _wait_rendered(page, needs_chart: bool, timeout_ms: int = 120_000) -> None:
    """The app view is up, the script run is over, and (where expected) a chart is drawn."""
    page.wait_for_selector('[data-testid="stAppViewContainer"]', timeout=timeout_ms)
    page.wait_for_selector('[data-testid="stMain"] h1', timeout=timeout_ms)
    if needs_chart:
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=timeout_ms)
    # The status widget says "Running..." while a script run is in flight; spinners mark slow steps.
    page.wait_for_function(
        """() => !document.querySelector('[data-testid="stStatusWidget"]')
                 && !document.querySelector('[data-testid="stSpinner"]')""",
        timeout=timeout_ms,
    )
    page.wait_for_timeout(800)  # let Plotly finish laying out before the screenshot


def _grow_and_shoot(page, shot: Path) -> None:
    """Streamlit scrolls inside its main section: grow the window to the content to see it all."""
    height = page.evaluate("""() => Math.max(...['stMain', 'stMainBlockContainer'].map(
        id => document.querySelector(`[data-testid="${id}"]`)?.scrollHeight || 0))""")
    page.set_viewport_size({"width": 1400, "height": int(min(max(height + 40, 1000), 6000))})
    page.wait_for_timeout(600)
    page.screenshot(path=str(shot), full_page=True)


def _page_problems(page, path: str, needs_chart: bool) -> list[str]:
    text = page.inner_text('[data-testid="stAppViewContainer"]')
    found = [w for w in ERROR_TEXT if w in text]
    problems = []
    if page.query_selector('[data-testid="stException"]') or found:
        problems.append(f"/{path}: {found or 'stException'}")
    if needs_chart and not page.query_selector(".js-plotly-plot"):
        problems.append(f"/{path}: no chart")
    return problems


def test_every_page_renders_in_chromium(server: str, own_loop_store: OwnLoopStore) -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium); the browser test needs it"
        )
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name, (path, needs_chart) in PAGES.items():
                page.goto(f"{server}/{path}", wait_until="domcontentloaded")
                _wait_rendered(page, needs_chart)
                _grow_and_shoot(page, SHOTS / f"{name}.png")
                problems += _page_problems(page, path, needs_chart)
                if name == "compare" and not page.query_selector(".js-plotly-plot path.js-fill"):
                    problems.append("/compare: no shaded band for the group of two seeds")
                page.set_viewport_size({"width": 1400, "height": 1000})
            # The README example's runs of torchvision models in a plain loop, linked by ?run=.
            for model, run_id in (("vit", own_loop_store.vit), ("video", own_loop_store.video)):
                for name in ("convergence", "schedule"):
                    path = f"{name}?run={run_id}"
                    page.goto(f"{server}/{path}", wait_until="domcontentloaded")
                    _wait_rendered(page, True)
                    _grow_and_shoot(page, SHOTS / f"own_loop_{model}_{name}.png")
                    problems += _page_problems(page, path, True)
                    text = page.inner_text('[data-testid="stAppViewContainer"]')
                    if f"{model}-own-loop" not in page.content():  # the run picker shows its name
                        problems.append(f"/{path}: the page does not show run {model}-own-loop")
                    if name == "schedule" and ("Predicted FLOP saving" not in text or "n/a" in text):
                        problems.append(f"/{path}: no predicted saving")
                    page.set_viewport_size({"width": 1400, "height": 1000})
        finally:
            browser.close()
    assert not problems, problems
    if os.environ.get("LAYERLOCK_DOCS_SCREENSHOTS") == "1":  # refresh the README's pictures
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        for name in DOC_PAGES:
            shutil.copyfile(SHOTS / f"{name}.png", DOC_IMAGES / f"{name}.png")


E2E_SEED_GROUP = "pixel-moving_digits-e2e3seed"


def test_convergence_page_on_a_group_of_three_seeds(server: str, store: Store, own_loop_store: OwnLoopStore) -> None:
    """Pick a group of three seeds on the Convergence page as a user would: the mean heatmap,
    banded mean curves, the convergence steps with their 95% intervals and rho over seeds show,
    with no error; the page is shot to test-artifacts/screenshots/convergence_group.png (and
    docs/images/ with ``LAYERLOCK_DOCS_SCREENSHOTS=1``)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    from analysis import io
    from analysis.testing import create_run_from_frames, synthetic_history, synthetic_layer_metrics

    folder = own_loop_store.folder  # the store's folder (see the store fixture)
    for seed in range(3):  # older than every other run: no page's default moves
        conv = [40 + 10 * seed, 80 + 20 * seed, 130 + 15 * seed, 170 - 10 * seed, None, None]
        create_run_from_frames(
            "layerlock",
            uri=store.uri,
            artifact_root=(folder / "artifacts").as_uri(),
            run_name=f"mae-3seed-{seed}",
            layer_df=synthetic_layer_metrics(conv, total_steps=240, probe_every=10, log_every=10, seed=seed),
            history=synthetic_history(240, 10, seed=seed),
            start_time=1_500_000_000_000 + seed,
            params={"train.seed": seed, "train.steps": 240, "model.depth": 6},
            tags={io.TAG_METHOD: "mae", io.TAG_DATASET: "moving_digits", io.TAG_GROUP: E2E_SEED_GROUP},
        )
    time.sleep(6)  # the server's run list is cached for 5 s (app.views.loaders.RUNS_TTL_S)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / "convergence_group.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{server}/convergence", wait_until="domcontentloaded")
            _wait_rendered(page, True)
            page.get_by_role("combobox", name="Group of seeds").click()
            page.get_by_role("option", name=f"{E2E_SEED_GROUP} · 3 runs").click()
            page.wait_for_selector("text=Run of the group", timeout=60_000)
            page.wait_for_selector("text=Convergence step by depth", timeout=60_000)
            _wait_rendered(page, True)
            _grow_and_shoot(page, shot)  # the whole page laid out (the table's caption comes last)
            page.wait_for_selector("text=over the runs in which the block converged", timeout=60_000)
            text = " ".join(page.inner_text('[data-testid="stAppViewContainer"]').split())  # wrapped lines joined
            content = page.content()
            problems = _page_problems(page, "convergence (group)", True)
            for wanted in ("95% t interval", "Spearman ρ", "seed 2", "rho > 0: held"):
                if wanted not in text:
                    problems.append(f"group view: no '{wanted}' on the page")
            shown = page.get_by_role("combobox", name="Run of the group").input_value()
            if shown != "all 3 seeds (mean)":
                problems.append(f"group view: the run picker shows {shown!r}, not the mean of the seeds")
            if "over 3 seeds" not in content:  # the heatmap's title
                problems.append("group view: no heatmap of the mean over 3 seeds")
            if len(page.query_selector_all(".js-plotly-plot path.js-fill")) < 6:
                problems.append("group view: fewer shaded bands than blocks")
        finally:
            browser.close()
    assert not problems, problems
    if os.environ.get("LAYERLOCK_DOCS_SCREENSHOTS") == "1":
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOC_IMAGES / "convergence_group.png")


@pytest.fixture(scope="module")
def bundle_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, BundleRuns, BundleRuns]:
    """Synthetic runs as a demo (one seed, the newest) and a study (two seeds, older) tag theirs:
    seconds to build, where a real tiny demo trains five runs and probes them."""
    folder = tmp_path_factory.mktemp("bundle-store")
    uri = f"sqlite:///{folder}/mlflow.db"
    study = add_bundle_runs(
        uri, folder, "study-20260101-090000", [0, 1], 1_700_000_000_000, ("mae", "layerlock", "latent_naive"), True
    )
    demo = add_bundle_runs(uri, folder, "demo-20260102-120000", [0], 1_700_000_100_000)
    return uri, demo, study


@pytest.fixture(scope="module")
def bundle_server(bundle_store, tmp_path_factory: pytest.TempPathFactory):
    yield from _serve(bundle_store[0], tmp_path_factory)


def test_pages_open_on_the_demo_and_the_study_page_and_csv_export(bundle_server: str, bundle_store) -> None:
    """After a demo: Compare shows MAE and LayerLock with no click, Convergence and Schedule the MAE
    baseline; the Study page shows the study's claims and figures; the runs CSV parses back to
    the store's values."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    import io as textio

    import pandas as pd
    from playwright.sync_api import sync_playwright

    from analysis import io

    uri, demo, study = bundle_store
    mae, ll = demo.runs["mae"][0], demo.runs["layerlock"][0]
    SHOTS.mkdir(parents=True, exist_ok=True)
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page.goto(f"{bundle_server}/compare", wait_until="domcontentloaded")
            _wait_rendered(page, True)
            problems += _page_problems(page, "compare", True)
            chips = page.inner_text('[data-testid="stMain"] [data-testid="stMultiSelect"] >> nth=1')  # single runs
            for rid, name in ((mae, "mae · mae"), (ll, "layerlock · layerlock")):
                if f"{name} · {rid[:8]}" not in chips:
                    problems.append(f"/compare: {name} {rid[:8]} not selected by default: {chips!r}")
            for name in ("convergence", "schedule"):
                page.goto(f"{bundle_server}/{name}", wait_until="domcontentloaded")
                _wait_rendered(page, True)
                problems += _page_problems(page, name, True)
                picked = page.inner_html('[data-testid="stMain"] [data-testid="stSelectbox"] >> nth=0')
                if f"mae · mae · {mae[:8]}" not in picked:
                    problems.append(f"/{name}: does not open on the demo's MAE run {mae[:8]}: {picked[-300:]!r}")
            page.goto(f"{bundle_server}/study?study={study.id}", wait_until="domcontentloaded")
            _wait_rendered(page, True)
            problems += _page_problems(page, "study", True)
            text = page.inner_text('[data-testid="stMain"]')
            if not all(f"S{i} " in text for i in range(5)) or "(N=2)" not in text:
                problems.append("/study: not every claim with its interval")
            if len(page.query_selector_all(".js-plotly-plot")) < 6:
                problems.append("/study: fewer than six figures")
            _grow_and_shoot(page, SHOTS / "study.png")
            page.set_viewport_size({"width": 1400, "height": 1000})
            page.goto(f"{bundle_server}/", wait_until="domcontentloaded")
            _wait_rendered(page, True)
            with page.expect_download(timeout=60_000) as download:
                page.get_by_role("button", name="Download runs (CSV)").click()
            table = pd.read_csv(textio.BytesIO(Path(download.value.path()).read_bytes()))
        finally:
            browser.close()
    assert not problems, problems
    stored = io.list_runs(uri).set_index("run_id")
    assert set(table["run_id"]) <= set(stored.index) and mae in set(table["run_id"])
    for row in table.itertuples(index=False):
        assert row.final_loss == stored.loc[row.run_id, "final_loss"]  # full precision, bit for bit
    if os.environ.get("LAYERLOCK_DOCS_SCREENSHOTS") == "1":
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHOTS / "study.png", DOC_IMAGES / "study.png")
