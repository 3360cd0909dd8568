"""The MLflow tracking store: its URI, the check before the first call, and links into its UI.

Before the first MLflow call the store is checked (`check_tracking_uri`): an http(s) server must answer
`GET <uri>/health` within `HEALTH_TIMEOUT_S` seconds, in one try, and a SQLite or file store needs a writable
directory. Without it an unreachable server shows only after MLflow's own retries (with its defaults,
`MLFLOW_HTTP_REQUEST_MAX_RETRIES=7` and `MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2`, about four and a half minutes).
Those retries still apply to a server lost in the middle of a run, so that a short restart does not fail it;
lower those variables to fail sooner.

Links: `run_url` / `model_version_url` give MLflow UI addresses when tracking is an http(s) server (else the
`runs:/` or `models:/` URI); `git_commit` names the code a run was made with.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from arborl.components.artifacts import storage
from arborl.components.config import Config

HEALTH_TIMEOUT_S = 5.0  # connect and read timeout of the tracking server's health check (one try)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be used: a server that does not answer, a directory that is not writable."""


def _writable_dir(directory: Path, uri: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingUnavailable(f"MLflow tracking store {uri}: cannot create directory {directory} ({exc})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise TrackingUnavailable(f"MLflow tracking store {uri}: directory {directory} is not writable")


def _open_sqlite_store(uri: str, db: Path) -> None:
    """Create or migrate a SQLite store's schema once, under a file lock beside it, so that runs starting at the
    same moment on a fresh root do not race to create its tables; a damaged database is a named error."""
    import fcntl

    import sqlalchemy.exc
    from mlflow import MlflowClient

    with open(db.with_name(db.name + ".init.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if db.exists() and db.stat().st_size == 0:
            raise TrackingUnavailable(
                f"MLflow tracking store {uri}: database {db} is empty (0 bytes), a truncated store; restore it from a "
                "backup, or move it away to start a new store (the runs it held are then gone from tracking)")
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates or migrates the schema
        except sqlalchemy.exc.DatabaseError as exc:
            reason = str(exc.orig) if getattr(exc, "orig", None) is not None else type(exc).__name__
            raise TrackingUnavailable(
                f"MLflow tracking store {uri}: database {db} cannot be read ({reason}); restore it from a backup, or "
                "move it away to start a new store") from None
        except Exception as exc:  # mlflow wraps some SQLite errors in its own exceptions
            if "malformed" in str(exc) or "not a database" in str(exc):
                raise TrackingUnavailable(
                    f"MLflow tracking store {uri}: database {db} is damaged ({str(exc).splitlines()[0]}); restore "
                    "it from a backup, or move it away to start a new store") from None
            raise


def check_tracking_uri(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Fail fast (`TrackingUnavailable`, naming the URL) when the tracking store at `uri` cannot be used.

    http(s): one `GET <uri>/health` with `timeout` seconds to connect and to read, no retries; an HTTP error
    status below 500 still proves a server is there. sqlite:/// and file: stores: the database's or store's
    directory is created if missing and must be writable, and an existing database file too. Other stores
    (databricks, SQL servers) are not checked."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        import requests

        url = uri.rstrip("/") + "/health"
        verify: bool | str = True
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            verify = False
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        try:
            response = requests.get(url, timeout=(timeout, timeout), verify=verify, allow_redirects=True)
        except requests.RequestException as exc:
            if isinstance(exc, requests.ConnectTimeout):
                reason = f"no connection within {timeout:g} s"
            elif isinstance(exc, requests.ReadTimeout):
                reason = f"no answer within {timeout:g} s"
            else:  # the socket error (e.g. "[Errno 111] Connection refused") without urllib3's wrapping
                found = re.search(r"\[Errno -?\d+\] [^'\")]*", str(exc))
                reason = found.group(0).strip() if found else type(exc).__name__
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable: GET {url} failed ({reason}); start the server or "
                f"point tracking.mlflow_uri / $MLFLOW_TRACKING_URI at a running one"
            ) from None
        if response.status_code >= 500:
            raise TrackingUnavailable(f"MLflow tracking server {uri} is not healthy: GET {url} answered HTTP "
                                      f"{response.status_code}")
    elif scheme == "sqlite":
        if uri.startswith("sqlite:///") and uri[len("sqlite:///"):] not in ("", ":memory:"):
            db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
            _writable_dir(db.parent, uri)
            if db.exists() and not os.access(db, os.R_OK | os.W_OK):
                raise TrackingUnavailable(f"MLflow tracking store {uri}: database {db} is not writable")
            _open_sqlite_store(uri, db)
    elif scheme in ("", "file") and uri and not uri.startswith("databricks"):
        _writable_dir(Path(parts.path if scheme == "file" else uri), uri)


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = cfg.run.output_root
    if not storage.is_local(root):
        raise ValueError(
            f"run.output_root={root!r} is remote: set tracking.mlflow_uri (or MLFLOW_TRACKING_URI) to an MLflow server"
        )
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def _is_http(uri: str | None) -> bool:
    return bool(uri) and urlsplit(uri).scheme.lower() in ("http", "https")


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI of the http(s) tracking server `uri`, else `runs:/<run_id>`."""
    if _is_http(uri):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"


def model_version_url(uri: str, name: str, version: str) -> str:
    """A registered version's page in the MLflow UI of the http(s) server `uri`, else `models:/<name>/<version>`."""
    if _is_http(uri):
        return f"{uri.rstrip('/')}/#/models/{name}/versions/{version}"
    return f"models:/{name}/{version}"


def git_commit(cwd: str | Path | None = None) -> str | None:
    """`git rev-parse HEAD` of the working directory, or None (not a git repository, no git, any error)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None
