"""The pipeline's MLflow run: one parent run per pipeline run, resumable after a crash, metrics by iteration.

The active MLflow run is thread-local, so everything here takes the run id explicitly and goes
through `MlflowClient`, which is safe from Prefect task threads. The store is checked before the first call
(`store.check_tracking_uri`). `Tracker.log_datasets` records the prompts as MLflow dataset inputs,
`Tracker.start_system_metrics` MLflow's `system/*` metrics.

A rerun of the same run root resumes its MLflow run only when the config is the same (`arborl.config_hash`);
after a config change the run's params would describe the old config, so a new MLflow run is made, tagged
`arborl.supersedes` with the old one.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from arborl.components.artifacts import storage
from arborl.components.config import Config
from arborl.components.tracking.store import check_tracking_uri, run_url, tracking_uri
from arborl.components.tracking.tags import CONFIG_HASH_TAG, RUN_ROOT_TAG, SUPERSEDES_TAG

RUN_ID_FILE = "_mlflow_run.json"
log = logging.getLogger("arborl.tracking")


def _dataset_source(uri: str):
    """MLflow's dataset source for a file URI (a local path, made absolute; s3://, ...)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if storage.is_local(uri):
        uri = str(Path(storage.filesystem(uri)[1]).resolve())
    with warnings.catch_warnings():  # a URI several registered sources accept: MLflow picks one and warns
        warnings.simplefilter("ignore")
        return resolve_dataset_source(uri)


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
        self.uri: str | None = None
        self.experiment_id: str | None = None
        self._system_metrics: bool = cfg.tracking.system_metrics
        self._monitor: Any = None
        self._pending: list | None = None  # metrics waiting for a request (`batched()`)
        self._in_batch = False
        self._every_s = cfg.tracking.update_every_s
        self._last_sent = time.monotonic()
        self._marker: str | None = None
        self.logged_through: int | None = None  # the last step whose batched metrics reached the store
        if not self.enabled:
            return
        from mlflow import MlflowClient

        uri = tracking_uri(cfg)
        check_tracking_uri(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///") and storage.is_local(cfg.run.output_root):
                location = (Path(cfg.run.output_root).resolve() / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        marker = self._marker = storage.join(run_root, RUN_ID_FILE)
        marked = storage.read_json(marker) if storage.exists(marker) else {}
        previous = marked.get("run_id")
        config_hash = cfg.section_hash()
        superseded = None  # an earlier MLflow run of this root made with another config: never resumed
        if previous is not None:
            try:
                run = self.client.get_run(previous)
                if run.info.lifecycle_stage == "active":
                    if run.data.tags.get(CONFIG_HASH_TAG, config_hash) == config_hash:
                        self.run_id, self.resumed = previous, True
                        self.logged_through = marked.get("logged_through")  # None: a marker from before batching
                        self.client.update_run(previous, status="RUNNING")
                    else:
                        superseded = previous
            except Exception:  # the tracking store was reset: start a fresh run
                self.run_id = None
        if self.run_id is None and superseded is None and "'" not in run_root:
            # a run created just before a crash, whose id never reached the marker (a finished run is never adopted)
            found = self.client.search_runs(
                [exp_id], filter_string=f"tags.`{RUN_ROOT_TAG}` = '{run_root}' and attributes.status != 'FINISHED' "
                f"and tags.`{CONFIG_HASH_TAG}` = '{config_hash}'",
                order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                self.run_id, self.resumed = found[0].info.run_id, True
                self.client.update_run(self.run_id, status="RUNNING")
                self.logged_through = 0
                self._mark()
        if self.run_id is None:
            tags = {CONFIG_HASH_TAG: config_hash, RUN_ROOT_TAG: run_root}
            if superseded is not None:  # its params and metrics describe the old config: a new run, linked to it
                tags[SUPERSEDES_TAG] = superseded
                log.warning("%s: the config changed since MLflow run %s; stages whose inputs or settings changed "
                            "rerun, and tracking goes to a new MLflow run", run_root, superseded)
            run = self.client.create_run(exp_id, run_name=cfg.run.name, tags=tags)
            self.run_id = run.info.run_id
            self.logged_through = 0
            self._mark()
        self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
        if not self.client.get_run(self.run_id).data.params:  # new, or created but killed before its params
            params = flatten(cfg.model_dump(mode="json"))
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
        """Log the numbers of `metrics` at `step`, keys prefixed; inside `batched()` they wait for its end."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(f"{prefix}{k}", float(v), now, step)
            for k, v in sorted(metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if self._pending is not None:
            self._pending.extend(items)
            return
        self._send(items)

    def _send(self, items: list) -> None:
        for i in range(0, len(items), 500):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def _mark(self) -> None:
        """The run-id marker: which MLflow run this root tracks, and through which step its metrics were sent."""
        storage.write_json(self._marker, {"run_id": self.run_id, "tracking_uri": self.uri,
                                          "logged_through": self.logged_through})

    def logged(self, step: int) -> bool:
        """Whether a finished stage's metrics at `step` reached this (resumed) run: step 0 is logged at once, a
        later step once its iteration's batch was sent (a kill -9 before that loses the batch, and a resumed run
        logs the skipped stages of that step again)."""
        return step == 0 or self.logged_through is None or step <= self.logged_through

    @contextlib.contextmanager
    def batched(self, step: int, final: bool = False) -> Iterator[None]:
        """Collect the metrics logged in the block (an RL iteration at `step`) and send what has gathered in one
        request at its end when `tracking.update_every_s` has passed since the last one, when `final`, or when
        the block fails; then mark `step` as logged. Until then later blocks add to the same request."""
        if not self.enabled or self._in_batch:  # off, or already collecting
            yield
            return
        self._in_batch, self._pending = True, self._pending if self._pending is not None else []
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            self._in_batch = False
            if failed or final or time.monotonic() - self._last_sent >= self._every_s:
                self.flush(step)

    def flush(self, step: int | None = None) -> None:
        """Send the waiting metrics now; with `step`, mark it as logged."""
        items, self._pending = self._pending or [], None
        if items:
            self._send(items)
        self._last_sent = time.monotonic()
        if step is not None:
            self.logged_through = max(step, self.logged_through or 0)
            self._mark()

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

    @property
    def url(self) -> str | None:
        """The run's MLflow UI address (http tracking) or `runs:/<id>`; None with tracking off."""
        return run_url(self.uri, self.experiment_id, self.run_id) if self.enabled else None

    def log_datasets(self, source_uri: str, frames: dict[str, Any], name: str = "prompts") -> list[str]:
        """Record pandas frames read from the file `source_uri` as the run's dataset inputs, one per context
        (`{"train": df, ...}` → dataset `<name>-train` with context `train`), with their digests. A dataset
        already recorded with the same name, digest and context (a resumed run) is not added again. Returns
        the contexts logged."""
        if not self.enabled:
            return []
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        source = _dataset_source(source_uri)
        have = {(d.dataset.name, d.dataset.digest, tuple(sorted((t.key, t.value) for t in d.tags)))
                for d in self.client.get_run(self.run_id).inputs.dataset_inputs}
        inputs, logged = [], []
        for context, frame in frames.items():
            with warnings.catch_warnings():  # pandas deprecation notices from MLflow's digest code
                warnings.simplefilter("ignore")
                dataset = mlflow.data.from_pandas(frame, source=source, name=f"{name}-{context}")._to_mlflow_entity()
            if (dataset.name, dataset.digest, ((MLFLOW_DATASET_CONTEXT, context),)) in have:
                continue
            inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
            logged.append(context)
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)
        return logged

    def start_system_metrics(self) -> None:
        """MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk, network, GPU) sampled by a
        background thread until `finish` (every 10 s; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it).
        Does nothing with `tracking.system_metrics: false` or tracking off; a resumed run continues the steps."""
        if not (self.enabled and self._system_metrics) or self._monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=self.resumed, tracking_uri=self.uri)
        self._monitor.start()

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self._pending:
            self.flush()
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)
