"""Where stages run: in-process, a process, a container or a Kubernetes Job, with their resources."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from arborl.components.config.base import Strict

STAGE_NAMES = ("prepare", "warmstart", "sample", "verify", "label", "train", "evaluate")
GPU_STAGES = ("warmstart", "sample", "train", "evaluate")  # run the policy model: one GPU each by default
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CPU = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
_MEMORY = re.compile(r"^\d+(Ki|Mi|Gi|Ti)?$")


class StageResources(Strict):
    cpu: str | None = Field(
        None, description="CPU cores requested (Kubernetes quantity: 2, 0.5 or 500m; docker --cpus); null: no request."
    )
    memory: str | None = Field(
        None, description="Memory limit as bytes or with Ki/Mi/Gi/Ti (e.g. 16Gi; docker --memory 16g); null: none.",
    )
    gpus: int = Field(0, ge=0, description="GPUs: Kubernetes nvidia.com/gpu requests and limits, docker --gpus N.")

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and not _CPU.match(value):
            raise ValueError(f"must be a number of cores such as 2, 0.5 or 500m, got {value!r}")
        return value

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and not _MEMORY.match(value):
            raise ValueError(f"must be bytes or a number with Ki/Mi/Gi/Ti such as 16Gi, got {value!r}")
        return value


class SecretRef(Strict):
    name: str = Field(..., description="Kubernetes Secret name (docker: the variable is passed from the launcher's "
                      "environment or orchestration.env_file, never written on the command line).")
    key: str = Field(..., description="Key inside the Secret whose value becomes the variable.")


class VolumeConfig(Strict):
    mount_path: str = Field(..., description="Absolute path inside the stage container.")
    host_path: str | None = Field(None, description="docker: host directory bind-mounted there.")
    claim: str | None = Field(None, description="kubernetes: PersistentVolumeClaim mounted there.")
    read_only: bool = Field(False, description="Mount read-only.")

    @model_validator(mode="after")
    def _source(self) -> VolumeConfig:
        if not self.mount_path.startswith("/"):
            raise ValueError(f"mount_path must be absolute, got {self.mount_path!r}")
        if self.host_path is None and self.claim is None:
            raise ValueError(f"{self.mount_path} needs host_path (docker) or claim (kubernetes)")
        return self


def _default_resources() -> dict[str, StageResources]:
    return {name: StageResources(gpus=1 if name in GPU_STAGES else 0) for name in STAGE_NAMES}


class OrchestrationConfig(Strict):
    executor: Literal["inprocess", "subprocess", "docker", "kubernetes"] = Field(
        "inprocess", description="Where each stage runs: inprocess (the flow's task process), subprocess (a child "
        "`arborl stage` process in the same environment), docker (a `docker run` container per stage) or kubernetes "
        "(a batch/v1 Job per stage). Every executor but inprocess reads the run's resolved config from "
        "<output_root>/<run.name>/config.json, so the output root must be reachable from where the stage runs.",
    )
    container_cli: Literal["docker", "podman"] = Field(
        "docker", description="docker executor: the container CLI that runs the stage containers (podman takes "
        "the same `run` arguments; rootless podman also gets --userns=keep-id, so files keep the user's uid).",
    )
    container_args: list[str] = Field(
        default_factory=list, description="docker executor: global arguments of the container CLI, before `run` "
        "(e.g. [--runtime, /path/to/infra/container/runc-no-rlimits] for podman where containers may not set "
        "resource limits).",
    )
    container_run_args: list[str] = Field(
        default_factory=list, description="docker executor: further arguments of `run`, before the image (e.g. "
        "[--network, host]).",
    )
    command: list[str] = Field(
        default_factory=lambda: ["arborl"], description="The command prefix that runs `stage ...` (the image's "
        "entrypoint is replaced by it); subprocess resolves a bare `arborl` to this environment's.",
    )
    images: dict[str, str] = Field(
        default_factory=lambda: {"default": "arborl:latest"}, description="docker/kubernetes: image per stage name; "
        "`default` for the stages not named (e.g. {default: arborl:latest, sample: arborl-sampler:latest}).",
    )
    resources: dict[str, StageResources] = Field(
        default_factory=_default_resources, description="docker/kubernetes: cpu, memory and gpus per stage name; "
        "entries given replace those stages' defaults, the others keep theirs (warmstart, sample, train, evaluate: "
        "1 GPU; prepare, verify, label: CPU only).",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables set in every stage "
                                "process/container (e.g. AWS_ENDPOINT_URL, HF_HOME).")
    secret_env: dict[str, SecretRef] = Field(
        default_factory=dict, description="Environment variables taken from secrets, by reference only (e.g. "
        "AWS_SECRET_ACCESS_KEY: {name: s3-credentials, key: secret-key}): Kubernetes secretKeyRef; docker passes "
        "the variable from the launcher's environment.",
    )
    env_file: str | None = Field(None, description="docker: an --env-file with further variables (e.g. secrets).")
    volumes: list[VolumeConfig] = Field(default_factory=list, description="Extra volumes mounted into every stage "
                                        "container (docker host_path, kubernetes claim).")
    namespace: str = Field("default", description="kubernetes: namespace of the stage Jobs.")
    service_account: str | None = Field(None, description="kubernetes: service account of the stage pods.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="kubernetes: the containers' imagePullPolicy."
    )
    backoff_limit: int = Field(0, ge=0, description="kubernetes: Job retries before it fails (the flow's task "
                               "retries once on its own).")
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="kubernetes: seconds a finished Job is kept.")
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="kubernetes: seconds a stage Job may run before it is failed; null: no limit."
    )
    poll_seconds: float = Field(5.0, gt=0, description="kubernetes: seconds between Job status checks.")
    dask_address: str | None = Field(
        None, description="With sampling.shards > 1: the address of a Dask scheduler (e.g. tcp://10.0.0.5:8786) "
        "whose workers run the sample shards; null runs them on a local process pool.",
    )

    @field_validator("images", "resources")
    @classmethod
    def _stage_keys(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        allowed = STAGE_NAMES + (("default",) if info.field_name == "images" else ())
        for key in value:
            if key not in allowed:
                raise ValueError(f"unknown stage {key!r}; use one of {', '.join(allowed)}")
        return value

    @field_validator("resources", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any) -> Any:
        # a partial dict (e.g. {train: {gpus: 2}}) replaces only those stages' entries
        return {**_default_resources(), **value} if isinstance(value, dict) else value

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is no environment variable name")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least the program (e.g. [arborl])")
        return value

    @model_validator(mode="after")
    def _every_stage_has_an_image(self) -> OrchestrationConfig:
        both = sorted(set(self.env) & set(self.secret_env))
        if both:
            raise ValueError(f"orchestration: {', '.join(both)} set in both env and secret_env")
        if self.executor in ("docker", "kubernetes") and "default" not in self.images:
            missing = [s for s in STAGE_NAMES if s not in self.images]
            if missing:
                raise ValueError(f"orchestration.executor={self.executor} needs an image for {', '.join(missing)}: "
                                 "add them or a default to orchestration.images")
        return self

    def image(self, stage: str) -> str:
        """The container image of `stage`."""
        return self.images.get(stage) or self.images["default"]

    def stage_resources(self, stage: str) -> StageResources:
        """cpu/memory/gpus of `stage`."""
        return self.resources.get(stage) or StageResources()
