"""Executors: run one stage outside the calling process — a child `arborl stage` process, a `docker run`
container or a Kubernetes Job — and return what the in-process call returns (a `StageResult`), read back from
the stage's manifest.

The stage process reads the run's resolved config from a URI (`<run root>/config.json`), its inputs and output
are URIs, so it needs nothing from the caller but shared storage."""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import threading
import time
from typing import IO, Any

from arborl.components.artifacts import manifests, storage
from arborl.components.config import Config
from arborl.components.orchestration.specs import docker_run_spec, kubernetes_job_manifest, stage_command
from arborl.components.stages.contract import StageResult

log = logging.getLogger("arborl.orchestration")
TAIL_LINES = 20  # lines of a failed stage's output quoted in the error


class StageFailed(RuntimeError):
    """A stage process, container or Job that did not finish: names the stage, where it ran, its exit code and
    the last lines of its output."""

    def __init__(self, stage: str, where: str, exit_code: int | None, tail: list[str], detail: str = ""):
        self.stage, self.exit_code, self.tail = stage, exit_code, tail
        code = f"exit code {exit_code}" if exit_code is not None else "no exit code"
        lines = "\n".join(f"  | {line}" for line in tail) or "  (no output)"
        super().__init__(f"stage {stage} failed ({where}, {code}){': ' + detail if detail else ''}; last lines of "
                         f"its output:\n{lines}")


class Executor:
    """Runs stage `name` of the run whose resolved config is at `config_uri`; subclasses start the work."""

    where = "executor"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def run(self, name: str, config_uri: str, inputs: dict[str, str], out: str, params: dict[str, Any]
            ) -> StageResult:
        """Run the stage and return its result, read from its manifest; `skipped` when the manifest already there
        before was left as it was (the stage found its output finished)."""
        before = manifests.read_manifest(out)
        started = time.time()
        self.execute(name, config_uri, inputs, out, params)
        manifest = manifests.read_manifest(out)
        if manifest is None or manifest.get("stage") != name:
            raise StageFailed(name, self.where, 0, [], f"it exited without a manifest of stage {name} in {out}")
        log.debug("stage %s ran %s in %.1fs", name, self.where, time.time() - started)
        return StageResult.from_manifest(out, manifest, skipped=before is not None and before == manifest)

    def execute(self, name: str, config_uri: str, inputs: dict[str, str], out: str, params: dict[str, Any]) -> None:
        raise NotImplementedError


def stream(argv: list[str], stage: str, where: str, env: dict[str, str] | None = None) -> None:
    """Run `argv`, logging its output as it comes (stderr — warnings, tracebacks — at INFO; stdout, the stage's
    result, at DEBUG); raise `StageFailed` with the last lines of both when it exits non-zero."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=env, text=True, errors="replace", bufsize=1)
    except FileNotFoundError as exc:
        raise StageFailed(stage, where, None, [], f"cannot start {argv[0]!r}: {exc}") from None

    def pump(pipe: IO[str], level: int) -> None:
        for line in pipe:
            line = line.rstrip("\n")
            tail.append(line)
            log.log(level, "[%s] %s", stage, line)

    assert proc.stdout is not None and proc.stderr is not None
    reader = threading.Thread(target=pump, args=(proc.stdout, logging.DEBUG), daemon=True)
    reader.start()
    try:
        pump(proc.stderr, logging.INFO)
        code = proc.wait()
        reader.join()
    finally:
        if proc.poll() is None:  # interrupted while the stage runs: do not leave it behind
            proc.kill()
            proc.wait()
    if code != 0:
        raise StageFailed(stage, where, code, list(tail))


class SubprocessExecutor(Executor):
    """A child `arborl stage` process in this Python environment, with `orchestration.env` added to this
    process's environment."""

    where = "subprocess"

    def command(self) -> list[str]:
        """`orchestration.command`, a bare `arborl` meaning this interpreter's `-m arborl.flows.cli`."""
        command = list(self.cfg.orchestration.command)
        return [sys.executable, "-m", "arborl.flows.cli"] if command == ["arborl"] else command

    def execute(self, name: str, config_uri: str, inputs: dict[str, str], out: str, params: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.cfg.orchestration.env}
        env.setdefault("COLUMNS", "200")  # the stage's console messages unwrapped in the log
        stream(stage_command(name, config_uri, inputs, out, params, command=self.command()), name, self.where, env)


class DockerExecutor(Executor):
    """A `docker run --rm` container per stage (components/orchestration/specs.py `docker_run_spec`), run with
    `orchestration.container_cli` (docker or podman; a failure names it); needs that CLI and an engine where the
    flow runs."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.where = cfg.orchestration.container_cli

    def execute(self, name: str, config_uri: str, inputs: dict[str, str], out: str, params: dict[str, Any]) -> None:
        stream(docker_run_spec(self.cfg, name, config_uri, inputs, out, params), name, self.where)


class KubernetesExecutor(Executor):
    """A batch/v1 Job per stage (specs.py `kubernetes_job_manifest`), created with the `kubernetes` client (in-
    cluster config, else ~/.kube/config) and polled until it succeeds or fails. The output root must be shared
    storage the pods reach (s3://, or a claim in `orchestration.volumes` mounted at a local root's path)."""

    where = "kubernetes"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        root = cfg.run.output_root
        if storage.is_local(root) and not any(v.claim and root.startswith(v.mount_path)
                                              for v in cfg.orchestration.volumes):
            raise ValueError(f"orchestration.executor=kubernetes: run.output_root {root!r} is local to this machine; "
                             "use shared storage (s3://...) or mount a claim at it (orchestration.volumes)")

    def execute(self, name: str, config_uri: str, inputs: dict[str, str], out: str, params: dict[str, Any]) -> None:
        try:
            from kubernetes import client
            from kubernetes import config as kube_config
        except ImportError:
            raise RuntimeError("orchestration.executor=kubernetes needs the kubernetes client: pip install "
                               "kubernetes") from None
        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException:
            kube_config.load_kube_config()
        orch = self.cfg.orchestration
        manifest = kubernetes_job_manifest(self.cfg, name, config_uri, inputs, out, params)
        job_name, namespace = manifest["metadata"]["name"], orch.namespace
        batch, core = client.BatchV1Api(), client.CoreV1Api()
        batch.create_namespaced_job(namespace, manifest)
        log.info("[%s] Job %s/%s created", name, namespace, job_name)
        while True:
            status = batch.read_namespaced_job_status(job_name, namespace).status
            if status.succeeded:
                return
            conditions = {c.type: c for c in status.conditions or [] if c.status == "True"}
            if "Failed" in conditions:
                break
            time.sleep(orch.poll_seconds)
        tail, code = [], None
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job_name}").items
        if pods:
            pod = max(pods, key=lambda p: p.metadata.creation_timestamp)
            for state in pod.status.container_statuses or []:
                if state.state and state.state.terminated:
                    code = state.state.terminated.exit_code
            try:
                tail = core.read_namespaced_pod_log(pod.metadata.name, namespace, tail_lines=TAIL_LINES).splitlines()
            except client.ApiException:
                tail = []
        reason = conditions["Failed"].reason or ""
        raise StageFailed(name, f"kubernetes Job {namespace}/{job_name}", code, tail, reason)


EXECUTORS: dict[str, type[Executor]] = {
    "subprocess": SubprocessExecutor,
    "docker": DockerExecutor,
    "kubernetes": KubernetesExecutor,
}


def make_executor(cfg: Config) -> Executor:
    """The executor of `orchestration.executor` (not inprocess: the caller runs the stage function itself)."""
    kind = cfg.orchestration.executor
    if kind not in EXECUTORS:
        raise ValueError(f"orchestration.executor={kind!r} runs stages in the calling process; no executor")
    return EXECUTORS[kind](cfg)
