"""Where and how stages run: outside the flow's process in a child process, a docker container or a Kubernetes
Job (`orchestration.executor`: executors.py, specs.py); which failures are worth a retry (error_policy.py); and
what is checked before a run starts (preflight.py)."""

from arborl.components.orchestration.executors import (
    DockerExecutor,
    Executor,
    KubernetesExecutor,
    StageFailed,
    SubprocessExecutor,
    make_executor,
)
from arborl.components.orchestration.specs import docker_run_spec, kubernetes_job_manifest, stage_command

__all__ = [
    "DockerExecutor",
    "Executor",
    "KubernetesExecutor",
    "StageFailed",
    "SubprocessExecutor",
    "docker_run_spec",
    "kubernetes_job_manifest",
    "make_executor",
    "stage_command",
]
