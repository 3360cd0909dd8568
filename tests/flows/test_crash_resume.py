"""`kill -9` of `arborl run` and a rerun of the same command: the same final weights as an uninterrupted run (bit
for bit), one MLflow run, one registered model version.

Each run is a real `arborl run` process (micro config, one RL iteration, in-stage train checkpoints, the registry
on) against the session's Prefect server and its own SQLite MLflow store. The process is killed with SIGKILL (its
whole process group) at three points: during the warm start (its output has the marker `_stage.json` but no
manifest), during the train stage (a complete in-stage checkpoint exists, the stage has no manifest), and between
registering the final model and setting its alias (the failpoint `registry.after_register`,
components/artifacts/failpoints.py). The killed process leaves its run lock behind; the rerun takes it over.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors.torch import load_file

from arborl.components.artifacts import manifests, storage
from arborl.components.artifacts.failpoints import ENV as FAILPOINT_ENV
from arborl.components.artifacts.run_lock import LOCK_FILE
from arborl.components.registry.gate import CHALLENGER
from arborl.components.stages.train import CHECKPOINT_DIR
from arborl.components.tracking.mlflow_run import RUN_ID_FILE
from arborl.flows.pipeline import SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "configs" / "micro.yaml")
NAME, MODEL_NAME, EXPERIMENT = "micro", "arborl-micro", "arborl"
# one iteration; the train stage takes 2 epochs × 4 mini-batches = 8 optimizer steps, checkpointed every 2
OVERRIDES = ["run.iterations=1", "run.threads=1", "warmstart.steps=8", "world.num_val=4", "world.num_test=8",
             "train.ppo_epochs=2", "train.mini_batches=4", "train.save_every_steps=2"]
RUN_TIMEOUT_S = 300


def _paths(base: Path) -> tuple[Path, str]:
    """(the run root, the MLflow store URI) of a run whose output root and store live under `base`."""
    return base / "runs" / NAME, f"sqlite:///{base / 'store' / 'mlflow.db'}"


def _start(base: Path, label: str, failpoint: str | None = None) -> tuple[subprocess.Popen, Path]:
    """Start `arborl run` for the output root under `base` in its own process group; its output goes to a log."""
    from prefect.settings import PREFECT_API_URL

    root, store = _paths(base)
    command = [sys.executable, "-m", "arborl.flows.cli", "run", "--config", MICRO, *OVERRIDES,
               f"run.output_root={root.parent}", f"tracking.mlflow_uri={store}"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    env.pop(FAILPOINT_ENV, None)
    if failpoint:
        env[FAILPOINT_ENV] = failpoint
    work = base / "cwd"
    work.mkdir(exist_ok=True)
    log = base / f"{label}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work,
                                start_new_session=True)
    return proc, log


def _wait(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        pytest.fail(f"arborl run took more than {RUN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
    return log.read_text()


def _complete(base: Path, label: str) -> str:
    """Run `arborl run` to completion; returns its output."""
    proc, log = _start(base, label)
    output = _wait(proc, log)
    assert proc.returncode == 0, output[-4000:]
    return output


def _rerun(base: Path) -> str:
    """Rerun the killed command to completion: it takes over the lock the killed process left behind."""
    output = _complete(base, "rerun")
    assert "taking over the stale lock" in output, output[-4000:]
    return output


def _kill_when(base: Path, ready: Callable[[], bool], what: str) -> None:
    """Start `arborl run`, poll until `ready()`, then SIGKILL its process group (as `kill -9` would)."""
    proc, log = _start(base, "killed")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"arborl run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {RUN_TIMEOUT_S} s")
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-4000:]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _versions(client: MlflowClient) -> list[tuple[str, str]]:
    return sorted((str(v.version), v.run_id) for v in client.search_model_versions(f"name='{MODEL_NAME}'"))


def _check_outcome(base: Path, reference: dict[str, torch.Tensor]) -> None:
    """The finished run under `base`: the reference's final weights, one MLflow run, one registered version."""
    root, store = _paths(base)
    summary = storage.read_json(str(root / SUMMARY_FILE))
    assert not (root / LOCK_FILE).exists()
    final = Path(summary["model"])
    assert final == root / "iter_001" / "train"
    assert not (final / CHECKPOINT_DIR).exists()
    _assert_identical(_weights(final), reference)

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.info.run_id, r.info.run_name, r.info.status) for r in runs] == [
        (summary["mlflow_run_id"], NAME, "FINISHED")]
    # metrics of stages finished before the kill are not logged a second time by the rerun
    assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "verify/reward_mean")] == [1]

    assert _versions(client) == [("1", summary["mlflow_run_id"])]
    assert summary["registry"]["version"] == "1"
    challenger = client.get_model_version_by_alias(MODEL_NAME, CHALLENGER)
    assert str(challenger.version) == "1" and challenger.tags["arborl.run_id"] == summary["mlflow_run_id"]
    assert challenger.tags["gate.decision"] in ("promote", "reject")
    # the registered version holds the final weights too
    location = client.get_logged_model(challenger.source.split("/")[-1]).artifact_location
    _assert_identical(_weights(Path(storage.filesystem(location)[1]) / "model"), reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_server) -> dict[str, torch.Tensor]:
    """The final weights of one uninterrupted run of the same config, in its own output root and store."""
    base = tmp_path_factory.mktemp("uninterrupted")
    _complete(base, "uninterrupted")
    root, _ = _paths(base)
    weights = _weights(root / "iter_001" / "train")
    warm = _weights(root / "warmstart")
    assert any(not torch.equal(weights[k], warm[k]) for k in weights)  # the RL step changed the model
    return weights


def test_kill_during_the_warm_start_then_rerun(tmp_path, reference):
    root, _ = _paths(tmp_path)
    warm = root / "warmstart"
    _kill_when(tmp_path, lambda: (warm / manifests.MARKER).exists() and not (warm / manifests.MANIFEST).exists(),
               "a warm start in progress")
    assert not (warm / manifests.MANIFEST).exists() and not (root / "iter_001").exists()
    assert (root / LOCK_FILE).exists()  # left behind by the killed process

    _rerun(tmp_path)
    _check_outcome(tmp_path, reference)


def test_kill_during_a_train_stage_with_checkpoints_then_rerun(tmp_path, reference):
    root, _ = _paths(tmp_path)
    train = root / "iter_001" / "train"
    _kill_when(tmp_path, lambda: any((train / CHECKPOINT_DIR).glob("step-*/checkpoint.json")),
               "a complete train checkpoint")
    assert not (train / manifests.MANIFEST).exists()
    assert (root / LOCK_FILE).exists()

    output = _rerun(tmp_path)
    assert "resuming from" in output, output[-4000:]  # the rerun continued from the checkpoint
    _check_outcome(tmp_path, reference)


def test_kill_between_registration_and_alias_then_rerun(tmp_path, reference):
    root, store = _paths(tmp_path)
    proc, log = _start(tmp_path, "killed", failpoint="registry.after_register")
    output = _wait(proc, log)
    assert proc.returncode == -signal.SIGKILL, output[-4000:]
    run_id = storage.read_json(str(root / RUN_ID_FILE))["run_id"]
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert _versions(client) == [("1", run_id)]  # registered ...
    with pytest.raises(MlflowException):  # ... but no alias yet
        client.get_model_version_by_alias(MODEL_NAME, CHALLENGER)
    assert not (root / SUMMARY_FILE).exists() and (root / LOCK_FILE).exists()

    _rerun(tmp_path)
    _check_outcome(tmp_path, reference)
