"""The stage command line, `docker run` argument lists and Kubernetes Job manifests rendered from a config.

No Docker engine or Kubernetes cluster exists here: the specs are checked as data, and the Jobs are validated
offline against Kubernetes' OpenAPI schemas (kubernetes-validate)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from arborl.components.config import load_config
from arborl.components.orchestration import docker_run_spec, kubernetes_job_manifest, stage_command
from arborl.components.orchestration.specs import workload_name
from arborl.components.stages import STAGES
from arborl.components.stages.contract import INPUTS

ROOT = Path(__file__).resolve().parents[3]
K8S_SCHEMA_VERSION = "1.32.0"  # the Kubernetes API version the Jobs are validated against (strict schemas)
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

S3_ROOT = "s3://arborl-runs/experiments"
CONFIG_URI = f"{S3_ROOT}/micro/config.json"
SECRETS = ["orchestration.secret_env={AWS_ACCESS_KEY_ID: {name: s3-credentials, key: access-key}, "
           "AWS_SECRET_ACCESS_KEY: {name: s3-credentials, key: secret-key}}"]
IMAGES = "orchestration.images={default: registry.example/arborl:1.0, sample: registry.example/arborl-sampler:1.0}"


def config(executor: str, *overrides: str):
    return load_config(ROOT / "configs" / "micro.yaml", [
        f"orchestration.executor={executor}", IMAGES, *SECRETS,
        "orchestration.env={AWS_ENDPOINT_URL: 'http://minio.storage:9000', HF_HOME: /cache/hf}",
        "orchestration.resources={train: {gpus: 2, cpu: 8, memory: 32Gi}, verify: {cpu: 500m, memory: 512Mi}}",
        *overrides])


def stage_call(name: str, iteration: int = 3, shard: tuple[int, int] | None = None) -> tuple:
    inputs = {key: f"{S3_ROOT}/micro/{key}-dir" for key in INPUTS[name].required()}
    params = {"iteration": iteration} if name in ("sample", "train") else {}
    if shard is not None:
        params["shard"] = shard
    return name, CONFIG_URI, inputs, f"{S3_ROOT}/micro/iter_003/{name}", params


def test_stage_command_is_the_cli_call():
    name, config_uri, inputs, out, params = stage_call("sample", shard=(1, 4))
    assert stage_command(name, config_uri, inputs, out, params) == [
        "arborl", "stage", "sample", "--config", CONFIG_URI, "--in", f"model={S3_ROOT}/micro/model-dir",
        "--in", f"world={S3_ROOT}/micro/world-dir", "--out", out, "--iteration", "3", "--shard", "1/4"]
    assert stage_command("prepare", "c.json", {}, "o", {}, command=["python", "-m", "arborl.flows.cli"]) == [
        "python", "-m", "arborl.flows.cli", "stage", "prepare", "--config", "c.json", "--out", "o"]
    with pytest.raises(ValueError, match="stage train: no command-line option for params \\['on_step'\\]"):
        stage_command("train", "c.json", {}, "o", {"on_step": print})


@pytest.mark.parametrize("name", list(STAGES))
def test_kubernetes_jobs_are_valid_and_carry_image_gpus_secrets_and_command(name):
    cfg = config("kubernetes", f"run.output_root={S3_ROOT}", "orchestration.namespace=training",
                 "orchestration.service_account=arborl-runner", "orchestration.active_deadline_seconds=7200",
                 "orchestration.volumes=[{mount_path: /cache, claim: model-cache}]")
    call = stage_call(name, shard=(0, 2) if name == "sample" else None)
    job = kubernetes_job_manifest(cfg, *call)
    assert kubernetes_validate.validate(job, K8S_SCHEMA_VERSION, strict=True) == "1.32"

    meta, spec = job["metadata"], job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert (job["apiVersion"], job["kind"], meta["namespace"]) == ("batch/v1", "Job", "training")
    assert DNS_1123_LABEL.match(meta["name"]) and len(meta["name"]) <= 63
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "arborl-runner"
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"], spec["activeDeadlineSeconds"]) == (0, 3600, 7200)
    assert container["image"] == ("registry.example/arborl-sampler:1.0" if name == "sample"
                                  else "registry.example/arborl:1.0")
    assert container["command"] == ["arborl"]
    assert container["args"] == stage_command(*call, command=())
    assert container["args"][:4] == ["stage", name, "--config", CONFIG_URI]

    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {
        "secretKeyRef": {"name": "s3-credentials", "key": "secret-key"}}}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["key"] == "access-key"
    assert env["AWS_ENDPOINT_URL"] == {"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"}

    resources = container["resources"]
    gpus = {"train": "2", "sample": "1", "warmstart": "1", "evaluate": "1"}.get(name)
    assert resources.get("limits", {}).get("nvidia.com/gpu") == gpus
    assert resources.get("requests", {}).get("nvidia.com/gpu") == gpus
    if name == "train":
        assert resources == {"requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"},
                             "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"}}
    assert container["volumeMounts"] == [{"name": "volume-0", "mountPath": "/cache", "readOnly": False}]
    assert pod["volumes"] == [{"name": "volume-0", "persistentVolumeClaim": {"claimName": "model-cache",
                                                                               "readOnly": False}}]

    labels = meta["labels"]
    assert labels == spec["template"]["metadata"]["labels"]
    assert labels["arborl/run"] == "micro" and labels["arborl/stage"] == name
    assert labels.get("arborl/iteration") == ("3" if name in ("sample", "train") else None)
    assert labels.get("arborl/shard") == ("0-of-2" if name == "sample" else None)
    assert all(LABEL_VALUE.match(v) and len(v) <= 63 for v in labels.values())


def test_a_broken_job_fails_schema_validation():
    """The schema check is strict: a misspelt field is caught, so the passing validations above mean something."""
    job = kubernetes_job_manifest(config("kubernetes", f"run.output_root={S3_ROOT}"), *stage_call("train"))
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_SCHEMA_VERSION, strict=True)


def test_job_names_fit_kubernetes_for_long_and_odd_run_names():
    long = config("kubernetes", f"run.output_root={S3_ROOT}", f"run.name=Run_{'x' * 80}.v2")
    other = config("kubernetes", f"run.output_root={S3_ROOT}", f"run.name=Run_{'x' * 80}.v3")
    params = {"iteration": 123, "shard": (7, 8)}
    name = workload_name(long, "evaluate", params, suffix="abc123")
    assert DNS_1123_LABEL.match(name) and len(name) <= 63 and name.endswith("-evaluate-it123-s7-abc123")
    assert name != workload_name(other, "evaluate", params, suffix="abc123")
    assert workload_name(long, "sample", params) != workload_name(long, "sample", params)  # a rerun: a new Job
    job = kubernetes_job_manifest(long, *stage_call("evaluate"))
    kubernetes_validate.validate(job, K8S_SCHEMA_VERSION, strict=True)
    assert LABEL_VALUE.match(job["metadata"]["labels"]["arborl/run"])


def test_docker_run_spec_for_a_gpu_stage_on_a_local_root(tmp_path):
    """The argument list only: no Docker engine runs here."""
    cfg = config("docker", "run.output_root=runs", "orchestration.env_file=/etc/arborl/s3.env",
                 "orchestration.volumes=[{mount_path: /data, host_path: /srv/data, read_only: true}]")
    call = stage_call("sample", shard=(1, 2))
    argv = docker_run_spec(cfg, *call, cwd=str(tmp_path), user="1000:1000", suffix="f00d")
    image = argv.index("registry.example/arborl-sampler:1.0")
    opts, tail = argv[:image], argv[image + 1:]
    assert opts[:5] == ["docker", "run", "--rm", "--name", "arborl-micro-sample-it003-s1-f00d"]
    assert tail == stage_command(*call, command=())
    assert opts[-2:] == ["--entrypoint", "arborl"]

    def values(flag: str) -> list[str]:
        return [opts[i + 1] for i, a in enumerate(opts) if a == flag]

    assert values("--gpus") == ["1"]
    assert values("--label") == ["arborl.run=micro", "arborl.stage=sample", "arborl.iteration=3", "arborl.shard=1-of-2"]
    assert values("-e") == ["AWS_ENDPOINT_URL=http://minio.storage:9000", "HF_HOME=/cache/hf", "AWS_ACCESS_KEY_ID",
                            "AWS_SECRET_ACCESS_KEY"]  # secrets by name only: docker copies their values
    assert values("--env-file") == ["/etc/arborl/s3.env"]
    root = str((tmp_path / "runs").resolve())
    assert values("-v") == ["/srv/data:/data:ro", f"{root}:{root}"]
    assert values("-w") == [str(tmp_path)] and values("--user") == ["1000:1000"]

    verify = docker_run_spec(cfg, *stage_call("verify"), cwd=str(tmp_path), user="1000:1000")
    assert "--gpus" not in verify
    assert verify[verify.index("--cpus") + 1] == "0.5" and verify[verify.index("--memory") + 1] == "512m"
    assert "registry.example/arborl:1.0" in verify


def test_docker_run_spec_on_s3_mounts_no_output_root():
    cfg = config("docker", f"run.output_root={S3_ROOT}", "orchestration.command=[python, -m, arborl.flows.cli]")
    argv = docker_run_spec(cfg, *stage_call("train"))
    assert "-w" not in argv and "--user" not in argv and "-v" not in argv
    assert argv[argv.index("--gpus") + 1] == "2" and argv[argv.index("--memory") + 1] == "32g"
    entry = argv.index("--entrypoint")
    assert argv[entry + 1:entry + 6] == ["python", "registry.example/arborl:1.0", "-m", "arborl.flows.cli", "stage"]


PODMAN = ("orchestration.container_cli=podman", "orchestration.container_args=[--runtime, /opt/runc-no-rlimits]",
          "orchestration.container_run_args=[--network, host]")


def test_podman_runs_the_same_container_with_its_global_and_run_arguments(tmp_path):
    """`container_cli: podman`: the same argument list as docker's, the CLI's global arguments before `run`."""
    call = stage_call("sample", shard=(1, 2))
    docker = docker_run_spec(config("docker", "run.output_root=runs"), *call, cwd=str(tmp_path), user="1000:1000",
                             suffix="f00d")
    podman = docker_run_spec(config("docker", "run.output_root=runs", *PODMAN), *call, cwd=str(tmp_path),
                             user="1000:1000", suffix="f00d")
    assert podman[:7] == ["podman", "--runtime", "/opt/runc-no-rlimits", "run", "--rm", "--name",
                          "arborl-micro-sample-it003-s1-f00d"]
    assert podman[7:9] == ["--network", "host"]
    # podman refuses a working directory missing in the container (docker makes it): an empty tmpfs is there;
    # rootless podman keeps the launcher's uid on the host
    extra = ["--tmpfs", str(tmp_path), *(["--userns=keep-id"] if os.getuid() != 0 else [])]
    entry = podman.index("--entrypoint")
    assert podman[entry - len(extra):entry] == extra
    assert docker == ["docker", "run", "--rm", "--name", "arborl-micro-sample-it003-s1-f00d",
                      *podman[9:entry - len(extra)], *podman[entry:]]
    inside = docker_run_spec(config("docker", "run.output_root=.", *PODMAN), *call, cwd=str(tmp_path))
    assert "--tmpfs" not in inside  # the working directory is the mounted root itself
    elsewhere = docker_run_spec(config("docker", f"run.output_root={tmp_path / 'runs'}", *PODMAN), *call,
                                cwd="/srv/checkout", user="1000:1000")
    assert elsewhere[elsewhere.index("-w") + 1] == "/srv/checkout"  # relative URIs resolve as outside containers
    assert elsewhere[elsewhere.index("--tmpfs") + 1] == "/srv/checkout"  # podman would refuse a missing one
    assert "--tmpfs" not in docker_run_spec(config("docker", f"run.output_root={tmp_path / 'runs'}"), *call,
                                            cwd="/srv/checkout", user="1000:1000")


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None, reason="renders as another uid: needs root")
def test_rootless_podman_keeps_the_launchers_uid(tmp_path):
    """Rendered by a process of uid 65534 (rootless podman): `--user 65534:65534 --userns=keep-id`."""
    code = ("import json, sys; from arborl.components.config import load_config; "
            "from arborl.components.orchestration import docker_run_spec; "
            f"cfg = load_config({str(ROOT / 'configs' / 'micro.yaml')!r}, ['orchestration.executor=docker', "
            f"'orchestration.container_cli=podman', 'run.output_root={tmp_path}']); "
            "print(json.dumps(docker_run_spec(cfg, 'prepare', 'c.json', {}, 'out', {}, cwd='/')))")
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                           code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    argv = json.loads(done.stdout)
    assert argv[argv.index("--user") + 1] == "65534:65534" and "--userns=keep-id" in argv
    as_root = docker_run_spec(load_config(ROOT / "configs" / "micro.yaml", [
        "orchestration.executor=docker", "orchestration.container_cli=podman", f"run.output_root={tmp_path}"]),
        "prepare", "c.json", {}, "out", {}, cwd="/")
    assert "--userns=keep-id" not in as_root


def test_the_kubernetes_job_runs_the_container_command_of_the_docker_executor():
    """The Job's container and the stage container of `executor: docker` (tests/flows/test_containers.py runs it)
    run the same image with the same command line."""
    for name in STAGES:
        call = stage_call(name)
        argv = docker_run_spec(config("docker", f"run.output_root={S3_ROOT}"), *call)
        entry = argv.index("--entrypoint")
        container = kubernetes_job_manifest(config("kubernetes", f"run.output_root={S3_ROOT}"), *call)[
            "spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == argv[entry + 2], name
        assert [*container["command"], *container["args"]] == [argv[entry + 1], *argv[entry + 3:]], name
