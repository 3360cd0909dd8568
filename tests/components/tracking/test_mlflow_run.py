"""components.tracking.Tracker on a real SQLite MLflow store: one MLflow run per pipeline run, resumed after a
crash — also after one that came between creating the run and recording its id; its links, dataset inputs and
system metrics."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pandas as pd
from mlflow import MlflowClient

from arborl.components.artifacts import storage
from arborl.components.config import Config
from arborl.components.tracking.mlflow_run import RUN_ID_FILE, Tracker
from arborl.components.tracking.store import git_commit, model_version_url, run_url


def _setup(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config(run={"output_root": str(tmp_path / "runs"), "name": "t"}, tracking={"experiment": "track"})
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    return cfg, storage.join(cfg.run.output_root, cfg.run.name), client


def _runs(client: MlflowClient) -> list:
    return client.search_runs([client.get_experiment_by_name("track").experiment_id])


def test_a_rerun_resumes_the_run_its_marker_names(tmp_path, monkeypatch):
    cfg, root, client = _setup(tmp_path, monkeypatch)
    first = Tracker(cfg, root)
    again = Tracker(cfg, root)
    assert again.run_id == first.run_id and again.resumed and len(_runs(client)) == 1


def test_a_run_created_just_before_a_crash_is_adopted_not_duplicated(tmp_path, monkeypatch):
    cfg, root, client = _setup(tmp_path, monkeypatch)
    first = Tracker(cfg, root)
    storage.remove(storage.join(root, RUN_ID_FILE))  # as if killed before the id reached the marker
    again = Tracker(cfg, root)
    assert again.run_id == first.run_id and again.resumed
    assert len(_runs(client)) == 1 and client.get_run(again.run_id).data.params["run.name"] == "t"


def test_a_finished_run_is_never_adopted(tmp_path, monkeypatch):
    cfg, root, client = _setup(tmp_path, monkeypatch)
    first = Tracker(cfg, root)
    first.finish("FINISHED")
    storage.remove(storage.join(root, RUN_ID_FILE))  # the outputs were deleted, the tracking store kept
    again = Tracker(cfg, root)
    assert again.run_id != first.run_id and not again.resumed and len(_runs(client)) == 2


def test_links_to_the_mlflow_ui_only_for_an_http_server():
    assert run_url("http://mlflow:5000/", "3", "abc") == "http://mlflow:5000/#/experiments/3/runs/abc"
    assert run_url("sqlite:///x.db", "3", "abc") == "runs:/abc"
    assert model_version_url("https://m.example", "arborl-tiny", "2") == "https://m.example/#/models/arborl-tiny/versions/2"
    assert model_version_url("sqlite:///x.db", "arborl-tiny", "2") == "models:/arborl-tiny/2"


def test_git_commit_of_a_repository_and_none_elsewhere(tmp_path):
    assert git_commit(tmp_path) is None  # not a repository
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *args], cwd=repo, check=True, env={**os.environ, **env})
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_commit(repo) == head and len(head) == 40


def test_prompt_datasets_are_logged_once_with_their_source(tmp_path, monkeypatch):
    cfg, root, client = _setup(tmp_path, monkeypatch)
    source = tmp_path / "prepare" / "prompts.parquet"
    frames = {"train": pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["q1", "q2"]}),
              "test": pd.DataFrame({"prompt_id": ["c"], "prompt": ["q3"]})}
    tracker = Tracker(cfg, root)
    assert tracker.log_datasets(str(source), frames) == ["train", "test"]
    assert Tracker(cfg, root).log_datasets(str(source), frames) == []  # a resumed run: nothing new
    inputs = client.get_run(tracker.run_id).inputs.dataset_inputs
    assert sorted((d.dataset.name, d.tags[0].value) for d in inputs) == [("prompts-test", "test"),
                                                                       ("prompts-train", "train")]
    assert {json.loads(d.dataset.source)["uri"] for d in inputs} == {str(source)}


def test_system_metrics_are_sampled_until_finish_and_can_be_turned_off(tmp_path, monkeypatch):
    cfg, root, client = _setup(tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = Tracker(cfg, root)
    tracker.start_system_metrics()
    deadline = time.time() + 30
    while time.time() < deadline and "system/cpu_utilization_percentage" not in client.get_run(
            tracker.run_id).data.metrics:
        time.sleep(0.2)
    tracker.finish()
    assert "system/cpu_utilization_percentage" in client.get_run(tracker.run_id).data.metrics
    off = Tracker(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "off"}),
                                         "tracking": cfg.tracking.model_copy(update={"system_metrics": False})}),
                  storage.join(cfg.run.output_root, "off"))
    off.start_system_metrics()
    assert off._monitor is None
    off.finish()


def test_batched_blocks_wait_for_update_every_s_then_go_in_one_request(tmp_path, monkeypatch):
    cfg, root, client = _setup(tmp_path, monkeypatch)  # tracking.update_every_s: 5 (the default)
    tracker = Tracker(cfg, root)
    sent = []
    real = tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (sent.append(k), real(*a, **k))[1])
    with tracker.batched(3):
        tracker.log_metrics({"reward_mean": 0.5, "leaves": 24}, step=3, prefix="verify/")
        tracker.log_metrics({"loss": -0.1}, step=3, prefix="train/")
        assert sent == []
    assert sent == [] and not tracker.logged(3)  # within 5 s of the start: the metrics wait
    with tracker.batched(4, final=True):  # an evaluated iteration: sent at once, with step 3's
        tracker.log_metrics({"loss": 0.3}, step=4, prefix="train/")
    assert len(sent) == 1 and len(sent[0]["metrics"]) == 4 and tracker.logged(4)
    try:
        with tracker.batched(5):
            tracker.log_metrics({"loss": 0.2}, step=5, prefix="train/")
            raise RuntimeError("a stage failed")
    except RuntimeError:
        pass
    assert len(sent) == 2  # sent although not due: the block failed
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(3, -0.1), (4, 0.3), (5, 0.2)]
    assert client.get_run(tracker.run_id).data.metrics["verify/leaves"] == 24
    again = Tracker(cfg, root)  # a rerun resumes the run and knows which steps reached it
    assert again.resumed and again.logged(5) and not again.logged(6)


def test_update_every_s_zero_sends_every_block_and_finish_sends_what_waits(tmp_path, monkeypatch):
    cfg, root, client = _setup(tmp_path, monkeypatch)
    every = Tracker(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"update_every_s": 0.0})}),
                    root)
    with every.batched(1):
        every.log_metrics({"loss": 1.0}, step=1, prefix="train/")
    assert every.logged(1)
    every.finish()
    waiting = Tracker(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "t2"})}),
                      storage.join(cfg.run.output_root, "t2"))
    with waiting.batched(1):
        waiting.log_metrics({"loss": 2.0}, step=1, prefix="train/")
    assert client.get_metric_history(waiting.run_id, "train/loss") == []
    waiting.finish()  # the run ends: what waited is sent
    assert [m.value for m in client.get_metric_history(waiting.run_id, "train/loss")] == [2.0]
