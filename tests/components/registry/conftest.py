"""A tracked run of a fresh SQLite MLflow store with a saved tiny model, for the registry's store and promotion."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from arborl.components.artifacts import storage
from arborl.components.config import Config
from arborl.components.tracking.mlflow_run import Tracker
from arborl.components.training.models import save_policy


@pytest.fixture
def tracked_run(tmp_path, tokenizer, tiny_model, monkeypatch):
    """A run of a fresh store under tmp_path/runs, a saved tiny model, and an empty working directory."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = Config(run={"output_root": str(tmp_path / "runs"), "name": "reg"}, registry={"model_name": "reg-model"},
                 tracking={"experiment": "reg-experiment"})
    root = storage.join(cfg.run.output_root, cfg.run.name)
    tracker = Tracker(cfg, root)
    model_dir = str(tmp_path / "model")
    save_policy(tiny_model, tokenizer, model_dir)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    return cfg, tracker.run_id, model_dir, client, cwd
