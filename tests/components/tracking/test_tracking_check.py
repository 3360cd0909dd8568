"""components.tracking: the tracking store is checked before the first MLflow call, so a server that is not
there fails in seconds (naming its URL) instead of after MLflow's minutes of retries."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from arborl.components.config import Config
from arborl.components.tracking.mlflow_run import Tracker
from arborl.components.tracking.store import TrackingUnavailable, check_tracking_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def health_server():
    """A local HTTP server whose /health answers the status in `status[0]`."""
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(status[0] if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", status
    server.shutdown()
    server.server_close()


def test_an_unreachable_server_fails_the_tracker_in_seconds_naming_the_url(tmp_path, monkeypatch):
    # MLflow's own retries (7 with backoff factor 2 by default: minutes) must not be in the way
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    url = f"http://127.0.0.1:{_free_port()}"
    cfg = Config(run={"output_root": str(tmp_path / "runs")}, tracking={"mlflow_uri": url})
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=rf"{url} is unreachable: GET {url}/health failed") as err:
        Tracker(cfg, str(tmp_path / "runs" / "tiny"))
    assert time.monotonic() - started < 10
    assert "\n" not in str(err.value)


def test_a_server_that_accepts_but_never_answers_fails_after_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingUnavailable, match=rf"{url}/health failed \(no answer within 1 s\)"):
            check_tracking_uri(url, timeout=1)
        assert time.monotonic() - started < 5


def test_a_healthy_server_passes_and_an_unhealthy_one_is_named(health_server):
    url, status = health_server
    check_tracking_uri(url)
    check_tracking_uri(url + "/")
    status[0] = 503
    with pytest.raises(TrackingUnavailable, match=rf"{url} is not healthy: .*HTTP 503"):
        check_tracking_uri(url)


def test_sqlite_and_file_stores_need_a_writable_directory(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'dir' / 'mlflow.db'}")  # created
    assert (tmp_path / "new" / "dir").is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(TrackingUnavailable, match=r"sqlite:///.*a-file/mlflow.db: cannot create directory"):
        check_tracking_uri(f"sqlite:///{blocker / 'mlflow.db'}")
    with pytest.raises(TrackingUnavailable, match="cannot create directory"):
        check_tracking_uri((blocker / "mlruns").as_uri())
    check_tracking_uri("postgresql://user@127.0.0.1:1/db")  # not checked here


@pytest.mark.slow  # starts processes
def test_sqlite_store_created_once_by_processes_starting_together_and_damage_is_named(tmp_path):
    """Three processes open a fresh SQLite store at the same moment: its schema is made once, under a lock, and
    all three get on. A truncated or emptied database is an error that says what to do, not a raw traceback or a
    silently new store."""
    import subprocess
    import sys

    db = tmp_path / "store" / "mlflow.db"
    uri = f"sqlite:///{db}"
    code = (f"from arborl.components.tracking.mlflow_run import check_tracking_uri; check_tracking_uri({uri!r}); "
            "print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])
    with pytest.raises(TrackingUnavailable, match=rf"database {db} cannot be read \(database disk image is malformed"):
        check_tracking_uri(uri)
    db.write_bytes(b"")
    with pytest.raises(TrackingUnavailable, match=r"is empty \(0 bytes\), a truncated store; restore it"):
        check_tracking_uri(uri)
