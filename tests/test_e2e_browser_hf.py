"""End to end in a real browser, on Hugging Face's own model: two tiny ``VideoMAEForPreTraining``
runs trained by the HF ``Trainer`` with :class:`core.integrations.huggingface.LayerLockCallback`
into a temporary sqlite store (MAE, and LayerLock with a schedule), then ``streamlit run
app/Home.py`` against that store and the Convergence and Schedule pages of each run in headless
Debian chromium (Playwright): no error text, a chart, the run's name on the page, a predicted
saving on the Schedule page. Screenshots in test-artifacts/screenshots/hf_*.png.

Starts streamlit and drives the browser as tests/test_e2e_browser.py does (its helpers).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_e2e_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    SHOTS,
    _grow_and_shoot,
    _page_problems,
    _wait_rendered,
    server,  # noqa: F401  (the fixture: streamlit on this module's `store`)
)

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = [
    pytest.mark.system,  # trains two framework runs, starts a Streamlit server and a browser
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated"),
]


class HFStore:
    def __init__(self, folder: Path) -> None:
        from analysis import io
        from experiments.examples import hf_videomae as hf

        self.folder, self.uri = folder, f"sqlite:///{folder}/mlflow.db"
        mae = hf.train(folder / "mae", 30, tracking_uri=self.uri, every=10)
        schedule = {"n_blocks": 4, "stages": [{"step": 10, "frozen": 2}]}
        ll = hf.train(folder / "ll", 20, schedule=schedule, latent=True, tracking_uri=self.uri, every=10)
        self.runs = {
            kind: (run_id, io.client(self.uri).get_run(run_id).info.run_name)
            for kind, run_id in (("mae", mae["run_id"]), ("layerlock", ll["run_id"]))
        }


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> HFStore:
    return HFStore(tmp_path_factory.mktemp("hf-store"))


def test_hf_runs_show_on_the_convergence_and_schedule_pages(server: str, store: HFStore) -> None:  # noqa: F811
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
            for kind, (run_id, run_name) in store.runs.items():
                for name in ("convergence", "schedule"):
                    path = f"{name}?run={run_id}"
                    page.goto(f"{server}/{path}", wait_until="domcontentloaded")
                    _wait_rendered(page, True)
                    _grow_and_shoot(page, SHOTS / f"hf_{kind}_{name}.png")
                    problems += _page_problems(page, path, True)
                    text = page.inner_text('[data-testid="stAppViewContainer"]')
                    if run_name not in page.content():  # the run picker shows its name
                        problems.append(f"/{path}: the page does not show run {run_name}")
                    if name == "schedule" and ("Predicted FLOP saving" not in text or "n/a" in text):
                        problems.append(f"/{path}: no predicted saving")
                    page.set_viewport_size({"width": 1400, "height": 1000})
        finally:
            browser.close()
    assert not problems, problems
