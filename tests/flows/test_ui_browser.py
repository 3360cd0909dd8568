"""What a user sees in the MLflow UI after a micro run, checked in a real browser.

A one-iteration micro run goes through the real training flow (the session's temporary Prefect server) with
tracking to an SQLite MLflow store in a temporary directory; then a real `mlflow server` (127.0.0.1) serves that
store and a headless Chromium, driven over the DevTools protocol, opens the pages a user would open: the
experiment's runs, the run (at the address `components.tracking.run_url` writes into the Prefect artifacts), the
registered model and its version (`model_version_url`). MLflow's UI is a single-page app: each check waits for the
page's text. Under CI (env CI set) a missing Chromium fails the tests; elsewhere they are skipped with the reason.
The Prefect side of the same run (artifact keys, task-run names, logs, links) is read back in test_dashboards.py.
"""

from __future__ import annotations

import base64
import os
import re
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from arborl.components.config import load_config
from arborl.components.tracking.store import model_version_url, run_url
from tests.components.viewer.test_tree_html import browser  # noqa: F401  (the headless Chromium fixture)
from tests.integration.servers import BIN, Service, free_port, running

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "configs" / "micro.yaml"
WAIT_S = 120
VIEWPORT = (1400, 1000)


@pytest.fixture(scope="module")
def micro_store(tmp_path_factory, prefect_server):
    """A one-iteration micro run through the real flow, tracked in `<tmp>/runs/mlflow.db`."""
    from mlflow import MlflowClient

    from arborl.flows.pipeline import train_pipeline

    tmp = tmp_path_factory.mktemp("ui")
    cfg = load_config(MICRO, [f"run.output_root={tmp / 'runs'}", "run.iterations=1"])
    state = train_pipeline(cfg.model_dump(mode="json"), str(MICRO), return_state=True)
    summary = state.result()
    db = tmp / "runs" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(summary["mlflow_run_id"])
    return SimpleNamespace(tmp=tmp, cfg=cfg, summary=summary, db=db, client=client, run=run,
                           experiment_id=run.info.experiment_id, flow_run_id=state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def mlflow_ui(micro_store):
    """`mlflow server` on 127.0.0.1 over the micro run's SQLite store; yields its base address."""
    base = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    server = Service("mlflow server", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                                       base.rsplit(":", 1)[1], "--backend-store-uri", f"sqlite:///{micro_store.db}",
                                       "--workers", "1"], micro_store.tmp / "mlflow-server.log", env, micro_store.tmp)
    with running(server):
        server.wait_http(f"{base}/health")
        yield base


def wait_text(page, *expected: str, pattern: str | None = None) -> str:
    """Wait until the page's text shows every `expected` string (and matches the regex `pattern`, if given);
    returns that text."""
    deadline, text = time.monotonic() + WAIT_S, ""
    while time.monotonic() < deadline:
        text = page.evaluate("document.body ? document.body.innerText : ''") or ""
        if all(e in text for e in expected) and (pattern is None or re.search(pattern, text)):
            return text
        time.sleep(0.5)
    missing = [e for e in expected if e not in text] + ([pattern] if pattern and not re.search(pattern, text) else [])
    raise AssertionError(f"{page.evaluate('location.href')}: {missing} not shown within {WAIT_S} s; the page "
                         f"shows:\n{text[:3000]}")


def open_page(page, url: str, *expected: str, pattern: str | None = None) -> str:
    """Open `url` (from a blank page, so no text of the previous route counts) and wait for its text."""
    page.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1], deviceScaleFactor=1,
              mobile=False)
    page.call("Page.navigate", url="about:blank")
    page.call("Page.navigate", url=url)
    return wait_text(page, *expected, pattern=pattern)


def click_text(page, text: str) -> None:
    """A real mouse click in the middle of the innermost element whose text is exactly `text`."""
    box = page.evaluate(
        "(() => { const el = [...document.querySelectorAll('body *')].find(e => e.childElementCount === 0 && "
        f"e.textContent.trim() === {text!r}); if (!el) return null; el.scrollIntoView({{block: 'center'}}); "
        "const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    assert box, f"no element with the text {text!r} on {page.evaluate('location.href')}"
    for kind in ("mousePressed", "mouseReleased"):
        page.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


def datasets(store) -> dict[str, str]:
    """The run's dataset inputs as shown by MLflow: `name (digest)` by context."""
    return {next(t.value for t in d.tags if t.key == "mlflow.data.context"): f"{d.dataset.name} ({d.dataset.digest})"
            for d in store.run.inputs.dataset_inputs}


def test_experiment_runs_page_lists_the_run_its_datasets_and_model(browser, micro_store, mlflow_ui):  # noqa: F811
    shown = datasets(micro_store)
    assert set(shown) == {"train", "val", "test"}
    name = micro_store.cfg.registry.model_name
    version = micro_store.summary["registry"]["version"]
    text = open_page(browser, f"{mlflow_ui}/#/experiments/{micro_store.experiment_id}/runs",
                     micro_store.run.info.run_name, *shown.values(), name,
                     pattern=rf"{re.escape(name)}\s+v{version}\b")  # the Models column
    assert micro_store.cfg.tracking.experiment in text.splitlines()  # the experiment's name heads the page


def test_run_page_shows_datasets_prefect_link_and_registered_model(browser, micro_store, mlflow_ui):  # noqa: F811
    shown = datasets(micro_store)
    url = run_url(mlflow_ui, micro_store.experiment_id, micro_store.run.info.run_id)
    name = micro_store.cfg.registry.model_name
    # the registered-models field loads after the rest of the page (it shows "None" until then)
    text = open_page(browser, url, "About this run", micro_store.run.info.run_id, "Datasets", shown["train"],
                     "Registered models", pattern=rf"Registered models\s+{re.escape(name)}")
    assert f"/runs/flow-run/{micro_store.flow_run_id}" in text  # the Prefect flow run's address, as a run tag
    # the other two datasets sit behind "+2": a real click opens them
    assert shown["val"] not in text and shown["test"] not in text
    click_text(browser, "+2")
    wait_text(browser, shown["val"], shown["test"])


def test_registered_model_and_version_pages(browser, micro_store, mlflow_ui, tmp_path):  # noqa: F811
    name = micro_store.cfg.registry.model_name
    version = micro_store.client.get_model_version(name, micro_store.summary["registry"]["version"])
    open_page(browser, f"{mlflow_ui}/#/models", "Registered Models", name)

    # the version's `arborl.run_id` tag names the run
    open_page(browser, f"{mlflow_ui}/#/models/{name}", name, f"Version {version.version}", "Versions", "challenger",
              micro_store.run.info.run_id)
    shot = browser.call("Page.captureScreenshot", format="png")["data"]
    png = base64.b64decode(shot)
    (tmp_path / f"mlflow-model-{name}.png").write_bytes(png)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    assert struct.unpack(">II", png[16:24]) == VIEWPORT  # width, height from the IHDR chunk

    # the version page: its source run (by name, once loaded), alias and the gate decision's sentence
    open_page(browser, model_version_url(mlflow_ui, name, version.version), f"Version {version.version}",
              "challenger", version.description.split(":")[0],
              pattern=rf"Source Run\s*:\s*{re.escape(micro_store.run.info.run_name)}\s")
