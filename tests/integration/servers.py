"""Real servers for integration tests, each on a free port of 127.0.0.1 and torn down on exit, also on a failure.

* `postgres`: a throwaway PostgreSQL cluster (Debian's `initdb`/`pg_ctl`) with trust auth, in a temporary folder
  owned by the `postgres` user when running as root (initdb refuses root).
* `moto_s3`: moto's S3 server in this process, with one bucket, and the environment (`AWS_*`,
  `MLFLOW_S3_ENDPOINT_URL`) that makes boto3, s3fs (components/artifacts/storage.py) and MLflow use it.
* `mlflow_server`: `mlflow server` on PostgreSQL, proxying artifacts to the moto bucket.
* `prefect_server`: `prefect server start` on PostgreSQL; `prefect_worker`: a process worker of a work pool.

Every server is a `Service`: a subprocess in its own session (process group) whose output goes to a log file;
`stop` terminates the whole group and any descendant that left it (a worker's flow-run processes), then kills
what is left after a grace period.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

BIN = Path(sys.executable).parent  # the virtual environment's console scripts (mlflow, prefect, arborl)
START_TIMEOUT_S = 120.0  # first start of a server runs its database migrations; a shared 2-core machine is slow
STOP_GRACE_S = 3.0  # the servers are throwaway: no need to wait long for a clean exit


class ServiceError(RuntimeError):
    """A server that did not start or answer; the message carries the end of its log."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 6000) -> str:
    """The last `chars` characters of a log file ('' when there is none)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without settings that would point a child at another Prefect server or
    profile, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN")}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _stop_tree(root: psutil.Process | None, pgid: int | None, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group `pgid` and every descendant of `root`, then SIGKILL what is left after `grace_s`."""
    procs: list[psutil.Process] = []
    if root is not None:
        with contextlib.suppress(psutil.Error):
            procs = [root, *root.children(recursive=True)]
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


@dataclass
class Service:
    """A subprocess in its own process group, its output in `log`."""

    name: str
    cmd: list[str]
    log: Path
    env: Mapping[str, str]
    cwd: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Service:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=dict(self.env), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        root = None
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
        _stop_tree(root, self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_GRACE_S)

    def wait_http(self, url: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until GET `url` answers 200; raise `ServiceError` with the log's end if the process exits or the
        time runs out."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if not self.running():
                raise ServiceError(f"{self.name} exited with {self.proc.returncode} before answering {url}; "
                                   f"its log {self.log}:\n{tail(self.log)}")
            try:
                resp = httpx.get(url, timeout=5.0)
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise ServiceError(f"{self.name} did not answer {url} within {timeout_s:.0f} s (last: {last}); "
                           f"its log {self.log}:\n{tail(self.log)}")


def stop_all(services: list[Service]) -> None:
    """Stop the services concurrently (each waits its own grace period)."""
    with ThreadPoolExecutor(max_workers=max(1, len(services))) as pool:
        list(pool.map(Service.stop, services))


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    """Start `service` and stop it (its whole process tree) on exit."""
    try:
        yield service.start()
    finally:
        service.stop()


# --- PostgreSQL ---------------------------------------------------------------------------------------------


def pg_bindir() -> Path | None:
    """The folder of `pg_ctl` and `initdb`: from PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


@dataclass
class Postgres:
    port: int
    root: Path
    log: Path
    host: str = "127.0.0.1"
    user: str = "postgres"

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"


def _as_postgres(cmd: list[str]) -> list[str]:
    """`cmd` run as the `postgres` system user when this process is root (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres(databases: tuple[str, ...] = ("prefect", "mlflow")) -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on a free port of 127.0.0.1 (trust auth, no durability) with `databases`."""
    bindir = pg_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL is not installed: no pg_ctl on PATH or in /usr/lib/postgresql/*/bin "
                                "(apt-get install -y postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise ServiceError("running as root needs the `postgres` system user to run PostgreSQL as "
                               "(the Debian package postgresql creates it)") from None
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="arborl-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, sockets, log = root / "data", root / "sock", root / "postgres.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(sockets, "postgres", "postgres")
    port = free_port()
    env = base_env(LC_ALL="C", LANG="C")
    try:
        try:
            subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                         "-E", "UTF8", "--no-sync", "--no-instructions"]),
                           env=env, check=True, capture_output=True, text=True, cwd=root)
            options = (f"-c listen_addresses=127.0.0.1 -c port={port} -k {sockets} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(data),
                                         "-l", str(log), "-o", options]),
                           env=env, check=True, capture_output=True, text=True, cwd=root)
            for name in databases:
                subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                name], env=env, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            raise ServiceError(f"postgres: {' '.join(exc.cmd)} failed ({exc.returncode}): {exc.stdout}"
                               f"{exc.stderr}\n{tail(log)}") from exc
        yield Postgres(port=port, root=root, log=log)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D", str(data)]),
                           env=env, capture_output=True, cwd=root)
            _kill_postmaster(data)
        shutil.rmtree(root, ignore_errors=True)


def _kill_postmaster(data: Path) -> None:
    """Kill the cluster's postmaster (and so its backends) if `pg_ctl stop` left it running."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if "postgres" in proc.name():
            _stop_tree(proc, None, grace_s=5.0)


# --- S3 (moto) ----------------------------------------------------------------------------------------------


@dataclass
class S3:
    endpoint: str
    bucket: str
    env: dict[str, str]

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@contextlib.contextmanager
def moto_s3(tmp: Path, bucket: str = "arborl") -> Iterator[S3]:
    """moto's S3 server on a free port of 127.0.0.1 (a thread of this process) holding `bucket`; `env` points
    boto3, s3fs and MLflow's artifact store at it with dummy credentials and no local AWS config."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,  # botocore (and so s3fs, components/artifacts/storage.py) reads this
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            "AWS_CONFIG_FILE": str(tmp / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-creds"),
        }
        s3 = S3(endpoint=endpoint, bucket=bucket, env=env)
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        server.stop()


# --- MLflow and Prefect servers -----------------------------------------------------------------------------


def mlflow_server(tmp: Path, pg: Postgres, s3: S3, artifacts_prefix: str = "mlflow") -> tuple[Service, str]:
    """An `mlflow server` on PostgreSQL (database `mlflow`) serving artifacts from s3://<bucket>/<prefix>; not
    started: use `running(service)`, then `service.wait_http(url + '/health')`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env(**s3.env)
    service = Service(
        name="mlflow server",
        cmd=[str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", pg.url("mlflow", driver="postgresql+psycopg2"), "--serve-artifacts",
             "--artifacts-destination", f"s3://{s3.bucket}/{artifacts_prefix}"],
        log=tmp / "mlflow-server.log", env=env, cwd=tmp,
    )
    return service, url


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a Prefect server, CLI or worker with its own PREFECT_HOME (no developer profile)."""
    env = base_env(PREFECT_HOME=str(home), PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
                   PREFECT_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO", **extra)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def prefect_server(tmp: Path, pg: Postgres) -> tuple[Service, str]:
    """A `prefect server start` on PostgreSQL (database `prefect`); not started. Returns it and its API URL."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(tmp / "prefect-server-home", PREFECT_API_DATABASE_CONNECTION_URL=pg.url(
        "prefect", driver="postgresql+asyncpg"), PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port))
    service = Service(name="prefect server",
                      cmd=[str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                      log=tmp / "prefect-server.log", env=env, cwd=tmp)
    return service, api


def prefect_cli(args: list[str], env: Mapping[str, str], cwd: Path | None = None,
                timeout_s: float = 180.0) -> subprocess.CompletedProcess:
    """Run `prefect <args>`; raise with its output when it fails."""
    res = subprocess.run([str(BIN / "prefect"), *args], env=dict(env), cwd=cwd, capture_output=True, text=True,
                         timeout=timeout_s, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise ServiceError(f"prefect {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def prefect_worker(tmp: Path, api_url: str, pool: str, env: Mapping[str, str], cwd: Path) -> Service:
    """A process worker of `pool` (created, or reset when it exists); not started. Flow runs inherit `env` and run in
    the deployment's working directory."""
    worker_env = prefect_env(tmp / "prefect-client-home", api_url, PREFECT_WORKER_QUERY_SECONDS="1",
                             PREFECT_WORKER_PREFETCH_SECONDS="5", **env)
    prefect_cli(["work-pool", "create", pool, "--type", "process", "--overwrite"], worker_env)
    return Service(name=f"prefect worker ({pool})",
                   cmd=[str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                   log=tmp / "prefect-worker.log", env=worker_env, cwd=cwd)


def wait_for_flow_run(api_url: str, flow_run_id: str, timeout_s: float,
                      services: tuple[Service, ...] = ()) -> dict:
    """Poll the Prefect API until the flow run is in a terminal state; return the flow run. Raises
    `ServiceError` with the services' logs when the time runs out or a service exits."""
    deadline = time.monotonic() + timeout_s
    run: dict = {}
    while time.monotonic() < deadline:
        run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=10.0).json()
        state = run.get("state") or {}
        if state.get("type") in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return run
        for service in services:
            if not service.running():
                raise ServiceError(f"{service.name} exited while flow run {flow_run_id} was "
                                   f"{state.get('name')}:\n{tail(service.log)}")
        time.sleep(1.0)
    raise ServiceError(f"flow run {flow_run_id} not finished after {timeout_s:.0f} s (state "
                       f"{(run.get('state') or {}).get('name')})")


def flow_run_logs(api_url: str, flow_run_id: str) -> str:
    """The flow run's log lines from the Prefect API."""
    resp = httpx.post(f"{api_url}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                     "sort": "TIMESTAMP_ASC", "limit": 200}, timeout=10.0)
    return "\n".join(f"{row['level']:>2} {row['message']}" for row in resp.json())


# --- everything together ------------------------------------------------------------------------------------


@dataclass
class Stack:
    """PostgreSQL, S3, an MLflow server, a Prefect server and a process worker, all running."""

    tmp: Path
    pg: Postgres
    s3: S3
    mlflow: Service
    mlflow_url: str
    prefect: Service
    prefect_api: str
    worker: Service
    pool: str
    client_env: dict[str, str]  # for `prefect`/`arborl` commands: the API URL, S3 and MLflow settings

    def services(self) -> tuple[Service, ...]:
        return (self.mlflow, self.prefect, self.worker)

    def logs(self) -> str:
        """The end of every server's log, for a failure message."""
        parts = [f"----- {s.name}: {s.log}\n{tail(s.log)}" for s in self.services()]
        parts.append(f"----- postgres: {self.pg.log}\n{tail(self.pg.log, 2000)}")
        return "\n".join(parts)


@contextlib.contextmanager
def stack(tmp: Path, worker_cwd: Path, pool: str = "arborl-process",
          worker_env: Mapping[str, str] | None = None) -> Iterator[Stack]:
    """Start the whole stack (the MLflow and Prefect servers concurrently) and tear it all down on exit; the
    worker's flow runs get the S3 and MLflow settings and `worker_env`."""
    tmp.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as es:
        pg = es.enter_context(postgres())
        s3 = es.enter_context(moto_s3(tmp))
        mlflow, mlflow_url = mlflow_server(tmp, pg, s3)
        prefect, api = prefect_server(tmp, pg)
        started: list[Service] = []
        es.callback(stop_all, started)  # before PostgreSQL and S3 go: the servers are stopped first
        started += [mlflow.start(), prefect.start()]
        prefect.wait_http(f"{api}/health")
        mlflow.wait_http(f"{mlflow_url}/health")
        client_env = prefect_env(tmp / "prefect-client-home", api, MLFLOW_TRACKING_URI=mlflow_url, **s3.env)
        flow_env = {"MLFLOW_TRACKING_URI": mlflow_url, **s3.env, **(worker_env or {})}
        worker = prefect_worker(tmp, api, pool, flow_env, worker_cwd)
        started.append(worker.start())
        yield Stack(tmp=tmp, pg=pg, s3=s3, mlflow=mlflow, mlflow_url=mlflow_url, prefect=prefect, prefect_api=api,
                    worker=worker, pool=pool, client_env=client_env)
