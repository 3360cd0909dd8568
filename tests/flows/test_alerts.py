"""Alerts end to end: a real `prefect server start` (SQLite, its own PREFECT_HOME; triggers and actions services
on), a local HTTP sink as the webhook, `create_alerts` against that server, then a failing arborl flow run and a
rejected-challenger event from a separate process → the sink receives the two JSON notifications."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from arborl.flows import alerts
from tests.integration.servers import BIN, Service, free_port, running

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 60


def _server_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED="true",
        PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED="true",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@pytest.fixture
def prefect_api(tmp_path):
    """A real `prefect server start` on 127.0.0.1 with a fresh SQLite database; killed in teardown."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server = Service("prefect server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                        str(port), "--log-level", "WARNING", "--no-scheduler", "--no-late-runs"],
                     # the server renders `{{ flow_run|ui_url }}` from its own PREFECT_UI_URL
                     tmp_path / "server.log", {**_server_env(home), "PREFECT_UI_URL": f"http://127.0.0.1:{port}"},
                     tmp_path)
    with running(server):
        server.wait_http(f"{api_url}/health")
        yield api_url, home


@pytest.fixture
def sink():
    """A local webhook receiver recording every POSTed JSON body."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                received.append(json.loads(body))
            except ValueError:
                received.append({"raw": body.decode(errors="replace")})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def _wait_for(received: list[dict], predicate, what: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for item in list(received):
            if predicate(item):
                return item
        time.sleep(0.5)
    raise AssertionError(f"no notification {what} within {WAIT_S} s; received: {received}")


PROBE = textwrap.dedent(
    """
    import json, sys
    from prefect import flow
    from arborl.flows.alerts import emit_challenger_rejected

    @flow(name="arborl-alert-probe", flow_run_name="probe-fails")
    def fails():
        raise RuntimeError("probe failure")

    @flow(name="other-flow", flow_run_name="other-fails")
    def other_fails():
        raise RuntimeError("not an arborl flow")

    @flow(name="arborl-alert-gate", flow_run_name="probe-gate")
    def gate():
        emit_challenger_rejected("arborl-micro", "2", json.loads(sys.argv[1]))

    for f in (other_fails, fails):
        state = f(return_state=True)
        assert state.is_failed(), state
    gate()
    """
)


def test_alerts_notify_webhook_on_failed_flow_and_rejected_challenger(prefect_api, sink, tmp_path):
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url, home = prefect_api
    hook_url, received = sink
    env = _server_env(home, api_url)
    env["PYTHONPATH"] = str(ROOT)
    with temporary_settings({PREFECT_API_URL: api_url}):
        first = alerts.create_alerts(hook_url, prefix="arborl-test")
        # the CLI a second time: the same block and automations are updated in place
        cli = subprocess.run([str(Path(sys.executable).parent / "arborl"), "alerts", "--webhook-url", hook_url,
                              "--prefix", "arborl-test"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        failed_auto = Automation.read(name="arborl-test-flow-run-failed")
        rejected_auto = Automation.read(name="arborl-test-challenger-rejected")
        with get_client(sync_client=True) as client:
            names = [a.name for a in client.read_automations()]
    assert [line.split()[0] for line in first] == ["saved", "created", "created"]
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert [line.split()[0] for line in cli.stdout.splitlines()] == ["saved", "updated", "updated"], cli.stdout
    assert sorted(names) == ["arborl-test-challenger-rejected", "arborl-test-flow-run-failed"]
    assert failed_auto.enabled and rejected_auto.enabled
    assert failed_auto.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert rejected_auto.trigger.expect == {alerts.REJECTED_EVENT}

    decision = {"decision": "reject", "reason": "interval includes 0", "metric": "eval/accuracy", "margin": 0.0,
                "n": 32, "challenger": 0.40625, "baseline": 0.4375, "delta": -0.03125, "ci_low": -0.125,
                "ci_high": 0.0625}
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    done = subprocess.run([sys.executable, str(script), json.dumps(decision)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    failed = _wait_for(received, lambda m: "probe-fails" in m.get("title", ""), "for the failed flow run")
    assert failed["title"] == "arborl: flow run probe-fails Failed"
    assert failed["source"] == "arborl-test-webhook"
    assert "Flow run probe-fails of flow arborl-alert-probe entered state Failed" in failed["body"]
    assert "probe failure" in failed["body"]  # the state message carries the exception
    assert f"URL: {api_url.removesuffix('/api')}/runs/flow-run/" in failed["body"]  # the flow run's UI address

    rejected = _wait_for(received, lambda m: "rejected" in m.get("title", ""), "for the rejected challenger")
    assert rejected["title"] == "arborl: challenger arborl-micro v2 rejected"
    for line in ("Metric: eval/accuracy", "Challenger: 0.40625", "Baseline: 0.4375",
                 "Delta: -0.03125 (95% interval [-0.125, 0.0625], n=32", "Reason: interval includes 0"):
        assert line in rejected["body"], rejected["body"]

    time.sleep(2)  # a failing flow that is not an arborl flow is not reported
    assert not any("other-fails" in m.get("title", "") + m.get("body", "") for m in received), received


def test_emit_challenger_rejected_never_raises(caplog):
    """Outside a flow and with a decision that is not a mapping, emitting logs a warning instead of raising."""
    with caplog.at_level(logging.WARNING, logger="arborl.flows"):
        alerts.emit_challenger_rejected("arborl-micro", "3", None)  # type: ignore[arg-type]
    assert any(alerts.REJECTED_EVENT in r.getMessage() and "arborl-micro v3" in r.getMessage() for r in caplog.records)


def test_cli_alerts_needs_a_server(monkeypatch):
    from typer.testing import CliRunner

    from arborl.flows.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = CliRunner().invoke(app, ["alerts", "--webhook-url", "http://127.0.0.1:9/hook"])
    assert res.exit_code == 2
    assert "PREFECT_API_URL" in res.output


def test_create_alerts_rejects_a_bad_url():
    with pytest.raises(ValueError, match="http:// or https://"):
        alerts.create_alerts("hooks.example/abc")


def test_json_safe_payload():
    assert alerts._json_safe({"a": float("nan"), "b": [1.5, float("inf")], "c": "x"}) == {
        "a": None, "b": [1.5, None], "c": "x"}
