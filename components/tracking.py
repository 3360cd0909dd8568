"""MLflow helpers: one parent run per pipeline run, resumable after a crash, metrics by iteration.

The active MLflow run is thread-local, so everything here takes the run id explicitly and goes
through `MlflowClient`, which is safe from Prefect task threads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from arborl.components import storage
from arborl.components.config import Config

RUN_ID_FILE = "_mlflow_run.json"


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = cfg.run.output_root
    if not storage.is_local(root):
        raise ValueError(
            f"run.output_root={root!r} is remote: set tracking.mlflow_uri (or MLFLOW_TRACKING_URI) to an MLflow server"
        )
    Path(root).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class Tracker:
    """The pipeline's MLflow parent run. `enabled=False` turns every call into a no-op."""

    def __init__(self, cfg: Config, run_root: str):
        self.enabled = cfg.tracking.enabled
        self.run_id: str | None = None
        self.resumed = False
        if not self.enabled:
            return
        from mlflow import MlflowClient

        uri = tracking_uri(cfg)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///") and storage.is_local(cfg.run.output_root):
                location = (Path(cfg.run.output_root).resolve() / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        marker = storage.join(run_root, RUN_ID_FILE)
        previous = storage.read_json(marker)["run_id"] if storage.exists(marker) else None
        if previous is not None:
            try:
                run = self.client.get_run(previous)
                if run.info.lifecycle_stage == "active":
                    self.run_id, self.resumed = previous, True
                    self.client.update_run(previous, status="RUNNING")
            except Exception:  # the tracking store was reset: start a fresh run
                self.run_id = None
        if self.run_id is None:
            run = self.client.create_run(exp_id, run_name=cfg.run.name, tags={"arborl.config_hash": cfg.section_hash()})
            self.run_id = run.info.run_id
            storage.write_json(marker, {"run_id": self.run_id, "tracking_uri": uri})
            params = flatten(cfg.model_dump(mode="json"))
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(f"{prefix}{k}", float(v), now, step)
            for k, v in sorted(metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact (e.g. `plots/curves.png`), replacing an earlier one."""
        if self.enabled:
            self.client.log_figure(self.run_id, figure, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """A JSON artifact, replacing an earlier one of the same name."""
        if self.enabled:
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)
