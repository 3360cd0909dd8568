"""What runs one stage outside the flow's process: the `arborl stage` command line, a `docker run` argument list
and a Kubernetes batch/v1 Job. Pure functions of the config and the stage call; nothing here starts anything."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from typing import Any

from arborl.components.artifacts import storage
from arborl.components.config import Config, StageResources

GPU_RESOURCE = "nvidia.com/gpu"
LABEL_PREFIX = "arborl"  # label keys: arborl/run, arborl/stage, arborl/iteration, arborl/shard
_MEMORY_UNITS = {"Ki": "k", "Mi": "m", "Gi": "g", "Ti": "t"}  # Kubernetes binary units → docker's (also binary)


def stage_command(name: str, config_uri: str, inputs: dict[str, str], out: str, params: dict[str, Any],
                  command: list[str] | tuple[str, ...] = ("arborl",)) -> list[str]:
    """`arborl stage NAME --config CONFIG --in k=v ... --out OUT [--iteration N] [--shard i/n]` (`command`
    replaces the leading `arborl`). Params other than iteration and shard are refused."""
    unknown = sorted(set(params) - {"iteration", "shard"})
    if unknown:
        raise ValueError(f"stage {name}: no command-line option for params {unknown}")
    argv = [*command, "stage", name, "--config", str(config_uri)]
    for key in sorted(inputs):
        argv += ["--in", f"{key}={inputs[key]}"]
    argv += ["--out", str(out)]
    if params.get("iteration") is not None:
        argv += ["--iteration", str(int(params["iteration"]))]
    if params.get("shard") is not None:
        index, count = params["shard"]
        argv += ["--shard", f"{int(index)}/{int(count)}"]
    return argv


def _label_value(value: str) -> str:
    """A Kubernetes label value: at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric."""
    value = re.sub(r"[^A-Za-z0-9._-]", "-", value)[:63]
    return value.strip("._-")


def stage_labels(cfg: Config, name: str, params: dict[str, Any]) -> dict[str, str]:
    """Labels naming the run, stage, iteration and shard of a stage container or Job."""
    labels = {f"{LABEL_PREFIX}/run": _label_value(cfg.run.name), f"{LABEL_PREFIX}/stage": name}
    if params.get("iteration") is not None:
        labels[f"{LABEL_PREFIX}/iteration"] = str(int(params["iteration"]))
    if params.get("shard") is not None:
        index, count = params["shard"]
        labels[f"{LABEL_PREFIX}/shard"] = f"{int(index)}-of-{int(count)}"
    return labels


def workload_name(cfg: Config, name: str, params: dict[str, Any], suffix: str | None = None) -> str:
    """A DNS-1123 name (at most 63 characters) for a stage's container or Job:
    `arborl-<run>-<stage>[-itNNN][-sI]-<suffix>`, the suffix random unless given (a resumed stage gets a new Job)."""
    suffix = suffix or uuid.uuid4().hex[:6]
    tail = name
    if params.get("iteration") is not None:
        tail += f"-it{int(params['iteration']):03d}"
    if params.get("shard") is not None:
        tail += f"-s{int(params['shard'][0])}"
    tail += f"-{suffix}"
    run = re.sub(r"[^a-z0-9]+", "-", cfg.run.name.lower()).strip("-") or "run"
    room = 63 - len("arborl--") - len(tail)
    if len(run) > room:  # a long run name: its start and a hash of all of it
        run = run[: room - 7].rstrip("-") + "-" + hashlib.sha1(cfg.run.name.encode()).hexdigest()[:6]
    return f"arborl-{run}-{tail}"


def _docker_memory(memory: str) -> str:
    for unit, short in _MEMORY_UNITS.items():
        if memory.endswith(unit):
            return memory[: -len(unit)] + short
    return memory  # plain bytes


def _docker_cpus(cpu: str) -> str:
    return str(int(cpu[:-1]) / 1000) if cpu.endswith("m") else cpu


def docker_run_spec(cfg: Config, name: str, config_uri: str, inputs: dict[str, str], out: str,
                    params: dict[str, Any], *, cwd: str | None = None, user: str | None = None,
                    suffix: str | None = None) -> list[str]:
    """The `docker run` argument list of one stage, for `orchestration.container_cli` (docker or podman, with
    `container_args` before `run` and `container_run_args` after it): the stage's image (`orchestration.images`),
    its entrypoint replaced by `orchestration.command`; `--gpus N`, `--cpus`, `--memory` from its resources;
    `orchestration.env` as `-e K=V`; each `secret_env` variable as a bare `-e NAME` (the CLI copies its value from
    the launcher's environment, so no secret is written in the argument list) plus `--env-file` when set; the
    volumes with a host_path. A local `run.output_root` is bind-mounted at the same absolute path, the container
    works in `cwd` (default: this process's) as the user `user` (default: this process's uid:gid; rootless podman,
    a launcher that is not root, also gets `--userns=keep-id` so that uid is the launcher's on the host too), so
    relative URIs and file ownership match a run outside containers. Podman does not create a missing working
    directory: unless `cwd` lies in the mounted root, it gets an empty tmpfs there (as docker's would be empty)."""
    orch = cfg.orchestration
    resources: StageResources = orch.stage_resources(name)
    argv = [orch.container_cli, *orch.container_args, "run", "--rm", "--name", workload_name(cfg, name, params, suffix)]
    argv += orch.container_run_args
    for key, value in stage_labels(cfg, name, params).items():
        argv += ["--label", f"{key.replace('/', '.')}={value}"]
    if resources.gpus:
        argv += ["--gpus", str(resources.gpus)]
    if resources.cpu:
        argv += ["--cpus", _docker_cpus(resources.cpu)]
    if resources.memory:
        argv += ["--memory", _docker_memory(resources.memory)]
    for key in sorted(orch.env):
        argv += ["-e", f"{key}={orch.env[key]}"]
    for key in sorted(orch.secret_env):
        argv += ["-e", key]
    if orch.env_file:
        argv += ["--env-file", orch.env_file]
    for volume in orch.volumes:
        if volume.host_path is not None:
            argv += ["-v", f"{volume.host_path}:{volume.mount_path}{':ro' if volume.read_only else ''}"]
    if storage.is_local(cfg.run.output_root):
        cwd = cwd or os.getcwd()
        local = os.path.expanduser(cfg.run.output_root.removeprefix("file://"))
        root = os.path.normpath(os.path.join(cwd, local))  # an absolute root stays as it is
        argv += ["-v", f"{root}:{root}", "-w", cwd, "--user", user or f"{os.getuid()}:{os.getgid()}"]
        if orch.container_cli == "podman":
            if cwd != "/" and os.path.commonpath([cwd, root]) != root:
                argv += ["--tmpfs", cwd]  # podman does not create a missing working directory (docker does)
            if os.getuid() != 0:  # rootless: the container's uid is not the host's
                argv += ["--userns=keep-id"]
    argv += ["--entrypoint", orch.command[0], orch.image(name)]
    return argv + stage_command(name, config_uri, inputs, out, params, command=orch.command[1:])


def kubernetes_job_manifest(cfg: Config, name: str, config_uri: str, inputs: dict[str, str], out: str,
                            params: dict[str, Any], *, suffix: str | None = None) -> dict[str, Any]:
    """A batch/v1 Job running one stage: one container (`orchestration.images`, `command` as its command, the
    `stage ...` arguments as args), env with `valueFrom.secretKeyRef` for each `secret_env` entry, requests and
    limits from the stage's resources (GPUs as `nvidia.com/gpu`), `restartPolicy: Never`, the Job's
    `backoffLimit`, `ttlSecondsAfterFinished` and labels naming the run, stage, iteration and shard."""
    orch = cfg.orchestration
    labels = {"app.kubernetes.io/name": "arborl", "app.kubernetes.io/component": name,
              **stage_labels(cfg, name, params)}
    resources: StageResources = orch.stage_resources(name)
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if resources.cpu:
        requests["cpu"] = resources.cpu
    if resources.memory:
        requests["memory"] = limits["memory"] = resources.memory
    if resources.gpus:  # an extended resource: its request must equal its limit
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(resources.gpus)
    env: list[dict[str, Any]] = [{"name": k, "value": orch.env[k]} for k in sorted(orch.env)]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            for k, ref in sorted(orch.secret_env.items())]
    container: dict[str, Any] = {
        "name": "stage",
        "image": orch.image(name),
        "imagePullPolicy": orch.image_pull_policy,
        "command": list(orch.command),
        "args": stage_command(name, config_uri, inputs, out, params, command=()),
        "env": env,
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
    }
    claims = [v for v in orch.volumes if v.claim is not None]
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if claims:
        container["volumeMounts"] = [{"name": f"volume-{i}", "mountPath": v.mount_path, "readOnly": v.read_only}
                                     for i, v in enumerate(claims)]
        pod["volumes"] = [{"name": f"volume-{i}", "persistentVolumeClaim": {"claimName": v.claim,
                                                                            "readOnly": v.read_only}}
                          for i, v in enumerate(claims)]
    if orch.service_account:
        pod["serviceAccountName"] = orch.service_account
    spec: dict[str, Any] = {
        "backoffLimit": orch.backoff_limit,
        "ttlSecondsAfterFinished": orch.ttl_seconds_after_finished,
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if orch.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = orch.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": workload_name(cfg, name, params, suffix), "namespace": orch.namespace,
                     "labels": labels},
        "spec": spec,
    }
