"""The MLflow UI in headless Chromium: a sweep's nested runs, a `ggn/...` chart, a spectrum plot.

The browser is Debian's chromium at /usr/bin/chromium, driven by Playwright; no browser is
downloaded. Screenshots are saved in the test's temporary folder (its path is printed).
"""

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import mlflow_server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 60_000


def require_browser():
    """Return Playwright's sync API, skipping (failing under CI) if it or Chromium is missing."""
    problems = []
    if not CHROMIUM.is_file():
        problems.append(f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
        problems.append("the playwright package is missing: pip install 'harness[test]'")
    if problems:
        if os.environ.get("CI"):
            pytest.fail("; ".join(problems) + " (.ci/run installs both)")
        pytest.skip("; ".join(problems))
    return sync_api


def test_ui_shows_sweep_chart_and_plot(parallel_sweep, tmp_path):
    sync_api = require_browser()
    result, folder = parallel_sweep
    assert result.returncode == 0, result.stderr
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("harness").experiment_id
    runs = client.search_runs([experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    print(f"Screenshots in {tmp_path}")

    with mlflow_server(uri, tmp_path) as url, sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1400, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        assistant_close = page.get_by_role("button", name="Close")

        # The experiment's runs: the sweep's parent run, expanded to show its child runs.
        page.goto(f"{url}/#/experiments/{experiment_id}/runs")
        parent_link = page.get_by_role("link", name=parent.info.run_name, exact=True)
        parent_link.wait_for()
        if assistant_close.count() == 1:
            # MLflow's assistant panel takes a third of the window; the screenshots need the room.
            assistant_close.click()
        row = page.locator(f"[role=row][row-id='{parent.info.run_id}']")
        row.locator("button[data-component-id*='runnamecellrenderer']").click()
        child_link = page.get_by_role("link", name="seed=2", exact=True)
        child_link.wait_for()
        for seed in (0, 1, 3):
            assert page.get_by_role("link", name=f"seed={seed}", exact=True).is_visible()
        page.screenshot(path=tmp_path / "runs.png")

        # A child run's chart of the largest GGN eigenvalue.
        child_link.click()
        page.get_by_role("tab", name="Model metrics").click()
        page.get_by_placeholder("Search metric charts").fill("ggn/all/eigval_max")
        page.get_by_text("eigval_max", exact=True).wait_for()
        # The chart is drawn by Plotly once the metric history has loaded.
        page.locator(".js-plotly-plot .scatterlayer path.js-line").first.wait_for()
        assert page.locator(".js-plotly-plot").count() == 1
        assert page.locator(".js-plotly-plot .xtick text").all_text_contents()[-1] == "6"
        page.screenshot(path=tmp_path / "metric.png")

        # The run's spectrogram, logged as a PNG artifact.
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("plots", exact=True).click()
        page.get_by_text("all", exact=True).click()
        page.get_by_text("spectrogram.png", exact=True).click()
        image = page.locator("img[alt='plots/all/spectrogram.png']")
        image.wait_for()
        page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=image.element_handle())
        width = image.evaluate("image => image.naturalWidth")
        page.screenshot(path=tmp_path / "artifact.png")
        context.close()

    assert width > 300
    for name in ["runs.png", "metric.png", "artifact.png"]:
        assert (tmp_path / name).stat().st_size > 10_000, name
