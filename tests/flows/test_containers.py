"""Stages in containers, for real: the pipeline image is built from the repository Dockerfile (FROM the local base
of infra/container/make-base-image.sh, with podman; layers already built with the same content are reused) and
the micro flow runs with `orchestration.executor: docker` through podman, each stage a container of that image.
Its trees (log-probabilities included), advantages and final weights equal an in-process run's.

Marker `container`: left out of `make test` and `make test-fast` (tests/conftest.py); `make test-container`
(`pytest -m container`) runs them, as does infra/container/ci.sh on a fresh machine. Under CI (env CI set) a
missing podman or runc fails the tests; elsewhere they are skipped with the reason. Containers run through
infra/container/runc-no-rlimits, the OCI runtime wrapper for hosts where a container may not set resource limits
(it changes nothing where they may)."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from arborl.components.artifacts import schemas, storage
from arborl.components.config import Config, load_config
from arborl.components.orchestration import DockerExecutor, StageFailed

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "infra" / "container"
RUNTIME = CONTAINER / "runc-no-rlimits"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "localhost/arborl-base:bookworm")
IMAGE = os.environ.get("ARBORL_TEST_IMAGE", "localhost/arborl:latest")
# one iteration, no MLflow; one torch thread so results compare exactly across processes
QUICK = ("run.iterations=1", "tracking.enabled=false", "registry.enabled=false", "run.threads=1")
CONTAINER_STAGES = ("prepare", "warmstart", "sample", "verify", "label", "train", "evaluate")


def _missing(reason: str) -> None:
    """Fail under CI, else skip, naming what is missing."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must install it (infra/container/ci.sh does)")
    pytest.skip(f"{reason}; CI runs this test")


def _script(argv: list[str], what: str) -> None:
    """Run one of infra/container's scripts; a failure quotes the last lines of its output."""
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-30:])
        pytest.fail(f"{what} failed (exit code {done.returncode}):\n{tail}")


@pytest.fixture(scope="session")
def container_image() -> str:
    """The pipeline image, built now (reusing podman's cached layers where the content is unchanged)."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            _missing(f"{tool} is not installed (apt-get install -y podman buildah debootstrap runc)")
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode != 0:
        if os.getuid() != 0:
            _missing(f"no base image {BASE_IMAGE}, and making one (debootstrap) needs root")
        _script([str(CONTAINER / "make-base-image.sh")], "infra/container/make-base-image.sh")
    _script([str(CONTAINER / "build-image.sh"), IMAGE], "infra/container/build-image.sh")
    return IMAGE


def micro(output_root: Path, *overrides: str) -> Config:
    return load_config(ROOT / "configs" / "micro.yaml", [f"run.output_root={output_root}", *overrides])


def in_containers(image: str) -> tuple[str, ...]:
    """Overrides that run every stage as a podman container of `image`, on the CPU."""
    cpu_only = ", ".join(f"{stage}: {{gpus: 0}}" for stage in CONTAINER_STAGES)
    return (
        "orchestration.executor=docker",
        "orchestration.container_cli=podman",
        f"orchestration.container_args=[--runtime, {RUNTIME}]",
        f"orchestration.images={{default: {image}}}",
        f"orchestration.resources={{{cpu_only}}}",
    )


def as_json(value) -> str:
    """Compared as JSON text, so NaN (e.g. the log-probability of a tool-output token) equals NaN."""
    return json.dumps(value, sort_keys=True)


def rows(uri: Path) -> list[str]:
    return [as_json(r) for r in storage.read_parquet(str(uri)).to_pylist()]


def containers_started(since: str) -> list[str]:
    """Names of the podman containers started since `since` (an RFC 3339 time), from podman's event log."""
    done = subprocess.run(
        ["podman", "events", "--stream=false", "--since", since, "--filter", "event=start", "--format", "{{.Name}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def test_stages_in_containers_give_the_in_process_results(tmp_path, prefect_server, container_image):
    from safetensors.torch import load_file

    from arborl.flows.pipeline import train_pipeline

    started = time.time()
    inprocess = train_pipeline(micro(tmp_path / "inprocess", *QUICK).model_dump(mode="json"))
    inprocess_seconds = time.time() - started

    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    started = time.time()
    summary = train_pipeline(
        micro(tmp_path / "container", *QUICK, *in_containers(container_image)).model_dump(mode="json")
    )
    print(
        f"micro flow, one iteration: in-process {inprocess_seconds:.1f} s, in containers {time.time() - started:.1f} s"
    )

    ran = containers_started(since)
    for stage in ("prepare", "warmstart", "sample", "verify", "label", "train", "evaluate"):
        assert any(name.startswith(f"arborl-micro-{stage}-") for name in ran), (stage, ran)

    a, b = tmp_path / "inprocess" / "micro", tmp_path / "container" / "micro"
    assert json.loads((b / "config.json").read_text())["orchestration"]["container_cli"] == "podman"
    it = Path("iter_001")
    assert rows(b / it / "sample" / schemas.NODES_FILE) == rows(a / it / "sample" / schemas.NODES_FILE)
    assert rows(b / it / "verify" / schemas.REWARDS_FILE) == rows(a / it / "verify" / schemas.REWARDS_FILE)
    assert rows(b / it / "label" / schemas.ADVANTAGES_FILE) == rows(a / it / "label" / schemas.ADVANTAGES_FILE)
    weights = sorted(p.relative_to(a / it / "train") for p in (a / it / "train").rglob("*.safetensors"))
    assert weights and weights == sorted(
        p.relative_to(b / it / "train") for p in (b / it / "train").rglob("*.safetensors")
    )
    for path in weights:
        mine, theirs = load_file(a / it / "train" / path), load_file(b / it / "train" / path)
        assert mine.keys() == theirs.keys(), path
        assert all(mine[k].equal(theirs[k]) for k in mine), path
    for key in ("final", "warmstart", "final_by_hops", "history"):
        assert as_json(summary[key]) == as_json(inprocess[key]), key
    for stage in (
        "prepare",
        "warmstart",
        "iter_001/sample",
        "iter_001/verify",
        "iter_001/label",
        "iter_001/train",
        "iter_001/eval",
    ):
        metrics = [json.loads((root / stage / "_manifest.json").read_text())["metrics"] for root in (a, b)]
        assert as_json(metrics[0]) == as_json(metrics[1]), stage

    # what the containers wrote in the mounted output root is the launching user's, not root's
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in b.rglob("*")}
    assert owners == {(os.getuid(), os.getgid())}


def test_a_failing_stage_in_a_container_reports_its_exit_code_and_last_lines(tmp_path, container_image):
    cfg = micro(tmp_path / "runs", *QUICK, *in_containers(container_image))
    config_uri = storage.child(storage.child(cfg.run.output_root, cfg.run.name), "config.json")
    storage.write_json(config_uri, cfg.model_dump(mode="json"))
    missing = str(tmp_path / "runs" / "micro" / "iter_001" / "sample")
    with pytest.raises(StageFailed) as failed:
        DockerExecutor(cfg).run(
            "verify",
            config_uri,
            {"nodes": missing, "world": missing},
            str(tmp_path / "runs" / "micro" / "iter_001" / "verify"),
            {},
        )
    message = str(failed.value)
    assert failed.value.stage == "verify" and failed.value.exit_code == 2  # the user's input: a missing input
    assert message.startswith("stage verify failed (podman, exit code 2)")
    assert "input 'nodes'" in message and "missing or incomplete" in message

    crash = "import sys; print('loading', flush=True); print('CUDA out of memory', file=sys.stderr); sys.exit(7)"
    cfg = micro(
        tmp_path / "runs", *QUICK, *in_containers(container_image), f'orchestration.command=[python, -c, "{crash}"]'
    )
    with pytest.raises(StageFailed, match=r"stage train failed \(podman, exit code 7\)") as failed:
        DockerExecutor(cfg).run("train", config_uri, {}, str(tmp_path / "out"), {"iteration": 1})
    assert sorted(failed.value.tail) == ["CUDA out of memory", "loading"]
