"""Safe by default: one writer per run root (two `arborl run` at once: one runs, the other exits at once), the
lock on `arborl stage` / `promote`, and an unreachable tracking server failing the command in seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient
from typer.testing import CliRunner

from arborl.components.artifacts import storage
from arborl.flows.cli import app
from arborl.flows.cli.errors import LOCKED_EXIT

ROOT = Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "configs" / "micro.yaml")
runner = CliRunner()

# another writer: takes the lock of argv[1], says so, and holds it until stdin closes
HOLDER = """
import sys
from arborl.components.artifacts.run_lock import RunLock
lock = RunLock(sys.argv[1], "test holder").acquire()
print("held", flush=True)
sys.stdin.read()
lock.release()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_two_runs_of_one_root_at_once_one_runs_and_the_other_exits_at_once(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL

    db = tmp_path / "store" / "mlflow.db"
    args = [sys.executable, "-m", "arborl.flows.cli", "run", "--config", MICRO, f"run.output_root={tmp_path / 'runs'}",
            "run.iterations=1", f"tracking.mlflow_uri=sqlite:///{db}"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200"}
    work = tmp_path / "cwd"  # the commands' working directory: nothing may land there
    work.mkdir()
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    started = time.monotonic()
    procs = []
    for log in logs:
        with open(log, "w") as out:
            procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work))
    seconds: dict[int, float] = {}
    while len(seconds) < 2 and time.monotonic() - started < 1200:
        for i, proc in enumerate(procs):
            if i not in seconds and proc.poll() is not None:
                seconds[i] = time.monotonic() - started
        time.sleep(0.1)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    outputs = [log.read_text() for log in logs]
    codes = [proc.returncode for proc in procs]
    assert sorted(codes) == [0, LOCKED_EXIT], (codes, outputs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    print(f"the refused run exited after {seconds[loser]:.1f} s; the run took {seconds[winner]:.1f} s")
    assert seconds[loser] < 30, outputs[loser]

    # the refused one: one line naming the lock and its holder (the other process), and it wrote nothing
    refused = outputs[loser].strip()
    assert len(refused.splitlines()) == 1, refused
    lock_uri = storage.join(str(tmp_path / "runs" / "micro"), "_lock.json")
    for part in ("locked:", f"pid {procs[winner].pid}", f"host {socket.gethostname()}", "since", "last heartbeat",
                 lock_uri):
        assert part in refused, (part, refused)

    # the one that ran: a complete run, one MLflow run, one registered version, metrics logged once
    summary = storage.read_json(str(tmp_path / "runs" / "micro" / "summary.json"))
    assert not (tmp_path / "runs" / "micro" / "_lock.json").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("arborl")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    versions = client.search_model_versions("name='arborl-micro'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", summary["mlflow_run_id"])]
    assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "verify/reward_mean")] == [1]
    assert sorted(m.step for m in client.get_metric_history(summary["mlflow_run_id"], "eval/test_em")) == [0, 1]
    assert list(work.iterdir()) == []  # no mlruns/ or mlflow.db in the working directory


def test_an_unreachable_tracking_server_fails_the_run_in_seconds_naming_the_url(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    res = runner.invoke(app, ["run", "--config", MICRO, f"run.output_root={tmp_path / 'runs'}",
                              f"tracking.mlflow_uri={url}"])
    assert time.monotonic() - started < 10
    assert res.exit_code == 1, res.output
    assert f"tracking: MLflow tracking server {url} is unreachable: GET {url}/health failed" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "micro").exists()  # the lock went, and the directory it made


def _hold(root: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_stage_and_promote_refuse_a_directory_another_writer_holds(tmp_path):
    out = str(tmp_path / "prepare")
    holder = _hold(out)
    try:
        res = runner.invoke(app, ["stage", "prepare", "--config", MICRO, "--out", out])
        assert res.exit_code == LOCKED_EXIT, res.output
        assert f"pid {holder.pid}" in _flat(res.output) and "command 'test holder'" in _flat(res.output)
        assert not (tmp_path / "prepare" / "world.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    res = runner.invoke(app, ["stage", "prepare", "--config", MICRO, "--out", out])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "prepare" / "_lock.json").exists()

    run_root = str(tmp_path / "runs" / "micro")
    holder = _hold(run_root)
    try:
        res = runner.invoke(app, ["promote", "--config", MICRO, f"run.output_root={tmp_path / 'runs'}"])
        assert res.exit_code == LOCKED_EXIT, res.output
        assert f"{run_root} is locked by another writer" in _flat(res.output)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_compare_refuses_a_method_run_another_writer_holds(tmp_path, prefect_server):
    run_root = str(tmp_path / "runs" / "micro-base-s0")  # the first run `arborl compare` makes
    holder = _hold(run_root)
    try:
        res = runner.invoke(app, ["compare", "--config", MICRO, "--seeds", "1", f"run.output_root={tmp_path / 'runs'}",
                                  f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
        assert res.exit_code == LOCKED_EXIT, res.output
        assert f"{run_root} is locked by another writer" in _flat(res.output)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_two_different_runs_at_once_on_a_fresh_root_both_finish(tmp_path, prefect_server):
    """Two `arborl run` of different run names start together on a fresh output root: both share the new SQLite
    tracking store, whose schema is made once under its lock, and both finish (no `duplicate column` or `no such
    index` from two processes creating it at once)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200"}
    root = tmp_path / "runs"
    procs, logs = [], []
    for name in ("first", "second"):
        log = tmp_path / f"{name}.log"
        logs.append(log)
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "arborl.flows.cli", "run", "--config", MICRO, f"run.output_root={root}",
                 f"run.name={name}", "run.iterations=1", "registry.enabled=false"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
    codes = [proc.wait(timeout=900) for proc in procs]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("arborl").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["first", "second"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_reward_that_always_raises_fails_the_run_once_with_one_line(tmp_path, prefect_server):
    """A reward callable that raises on every call: the run fails at the warm start's evaluation, before anything
    is trained or registered, once — a deterministic error is not retried — and `arborl run` exits 2 with one
    stderr line naming the callable, the count and the first error."""
    calls = tmp_path / "calls.txt"
    reward = tmp_path / "broken_reward.py"
    reward.write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        f"    with open({str(calls)!r}, 'a') as f:\n"
        "        f.write('x')\n"
        "    raise RuntimeError('judge unreachable')\n")
    res = runner.invoke(app, ["run", "--config", MICRO, f"run.output_root={tmp_path / 'runs'}", "run.iterations=1",
                              f"verify.reward.default={reward}:compute_score", "verify.breaker=0"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("run failed (input): RewardErrors: evaluate (greedy): 20 of 20 reward calls failed")
    assert f"({reward}:compute_score)" in _flat(res.stderr) and "judge unreachable" in res.stderr
    assert len(calls.read_text()) == 20  # the 20 val + test questions, once: the stage was not retried
    log = tmp_path / "runs" / "micro" / "errors.log"  # the traceback the console line leaves out
    assert f"(the traceback: {log})" in _flat(res.stderr)
    assert "Traceback (most recent call last)" in log.read_text() and "RewardErrors: evaluate" in log.read_text()
    assert not (tmp_path / "runs" / "micro" / "warmstart_eval" / "_manifest.json").exists()
    assert not (tmp_path / "runs" / "micro" / "iter_001").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert client.search_registered_models() == []
