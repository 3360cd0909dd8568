"""components.tracking.Tracker on a real SQLite MLflow store: one MLflow run per pipeline run, resumed after a
crash — also after one that came between creating the run and recording its id."""

from __future__ import annotations

from mlflow import MlflowClient

from arborl.components import storage
from arborl.components.config import Config
from arborl.components.tracking import RUN_ID_FILE, Tracker


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
