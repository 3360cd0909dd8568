"""The MLflow model registry: registering a run's final model, lineage tags, seeding a champion, and
downloading a registered version as a plain Hugging Face model directory.

`register_final_model` logs the run's final model directory with MLflow's transformers flavor, registers it
under `registry.model_name`, gives it the alias `challenger` and tags it with the run, the config hash, the
weights' digest and the eval metrics; one version per weights and run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from arborl.components.artifacts import manifests, model_files, storage
from arborl.components.artifacts.failpoints import failpoint
from arborl.components.config import Config
from arborl.components.registry.gate import CHALLENGER, CHAMPION
from arborl.components.tracking.store import check_tracking_uri, tracking_uri
from arborl.components.tracking.tags import (
    CONFIG_HASH_TAG,
    DATA_SNAPSHOT_TAG,
    DATA_URI_TAG,
    MODEL_URI_TAG,
    ORIGIN_TAG,
    PARENT_MODEL_URI_TAG,
    PARENT_VERSION_TAG,
    RUN_ID_TAG,
    WEIGHTS_TAG,
)


def _client(cfg: Config):
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    check_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)




def weights_digest(model_uri: str) -> str:
    """One digest of a model directory's weights and tokenizer (its training state left out), from its stage
    manifest's file digests where it has one, else from the files themselves."""
    from arborl.components.artifacts import stage_keys

    manifest = manifests.read_manifest(model_uri)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        files = stage_keys.file_digests(model_uri)
    kept = {rel: meta["sha256"] for rel, meta in sorted(files.items())
            if rel.split("/")[0] not in model_files.TRAINING_STATE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def run_versions(client, name: str, run_id: str) -> list:
    """The versions of registered model `name` made from MLflow run `run_id`, oldest first."""
    found = client.search_model_versions(f"run_id='{run_id}'")
    return sorted((v for v in found if v.name == name and v.run_id == run_id), key=lambda v: int(v.version))


@contextlib.contextmanager
def _fluent_uri(cfg: Config, experiment_id: str | None = None):
    """Point MLflow's process-global (fluent) API at this run's store (and, given, its experiment, through
    $MLFLOW_EXPERIMENT_ID) for the block, then restore it: the transformers flavor's log_model and artifact
    downloads go through it, and mlflow.set_tracking_uri also writes $MLFLOW_TRACKING_URI, which would leak into
    later runs of the same process."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")}
    saved_uri = mlflow.get_tracking_uri() if is_tracking_uri_set() else None
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)  # None also clears $MLFLOW_TRACKING_URI
        mlflow.set_registry_uri(saved_env["MLFLOW_REGISTRY_URI"])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def register_final_model(
    cfg: Config,
    run_id: str,
    model_uri: str,
    metrics: dict[str, float],
    extra_tags: dict[str, str] | None = None,
    alias: str = CHALLENGER,
) -> str:
    """Log the model directory at `model_uri` to run `run_id` with the transformers flavor, register it
    under `registry.model_name`, point `alias` (`challenger`) at it and tag it. Returns the version.

    Idempotent per run: a run that already registered a version (a resumed run, a rerun after a crash between
    registering and setting the alias) gets that version back. The model is logged in the run's own experiment,
    under its artifact location (a LoggedModel made here, so MLflow's process-wide default experiment and the
    working directory are never used).
    """
    import mlflow
    import torch
    import transformers

    from arborl.components.training.models import load_policy

    client = _client(cfg)
    name = cfg.registry.model_name
    digest = weights_digest(model_uri)
    # a version this run registered from these very weights (one whose tags were not written yet counts: a crash
    # between registering and tagging); other weights are another version
    existing = [v for v in run_versions(client, name, run_id) if v.tags.get(WEIGHTS_TAG, digest) == digest]
    if existing:
        version = str(existing[-1].version)
    else:
        # MLflow 3.17's local-checkpoint path (transformers_model=<dir>) fails on transformers 5 (its
        # pipeline registry stores class paths as strings), so the model is loaded once and logged as
        # components; the flavor then writes it with save_pretrained.
        model, tokenizer = load_policy(model_uri, "cpu", cfg.storage.cache_max_gb, cfg.model.dtype)
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(experiment_id, name="model", source_run_id=run_id)
        with _fluent_uri(cfg, experiment_id):
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name="model",
                model_id=logged.model_id,
                task="text-generation",
                run_id=run_id,
                registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                  f"transformers=={transformers.__version__}"],
            )
        version = str(info.registered_model_version)
        failpoint("registry.after_register")  # crash-safety tests: a kill between registering and the alias
    tags = {RUN_ID_TAG: run_id, CONFIG_HASH_TAG: cfg.section_hash(), MODEL_URI_TAG: model_uri,
            WEIGHTS_TAG: digest, **(extra_tags or {})}
    tags.update({f"eval.{k}": f"{v:.6g}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))})
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.set_registered_model_alias(name, alias, version)
    return version


def lineage_tags(cfg: Config, parent_version: str | None = None, parent_model_uri: str | None = None
                 ) -> dict[str, str]:
    """Where a model came from, as MLflow tags for its run and its registered version: the registered version it
    was trained from (`none`) and that model's URI (default: `model.path`, `none` for a fresh model), the data
    snapshot (`none` without data.snapshot_root), the data's URI and the config hash."""
    from arborl.components.data import snapshots

    return {
        PARENT_VERSION_TAG: parent_version or "none",
        PARENT_MODEL_URI_TAG: parent_model_uri or cfg.model.path or "none",
        DATA_SNAPSHOT_TAG: snapshots.snapshot_name(cfg.data),
        DATA_URI_TAG: snapshots.data_uri(cfg.data),
        CONFIG_HASH_TAG: cfg.section_hash(),
    }


def _experiment_id(client, cfg: Config) -> str:
    """The id of `tracking.experiment`, created (artifacts beside a local SQLite store, as the pipeline's
    tracker does) when missing."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri(cfg).startswith("sqlite:///") and storage.is_local(cfg.run.output_root):
        location = (Path(cfg.run.output_root).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)




def seed_champion(cfg: Config, model_uri: str) -> str:
    """Register the model directory `model_uri` (local, s3:// or a Hub id, as `models.load_policy` reads it) as a
    new version of `registry.model_name`, logged in its own MLflow run of `tracking.experiment`, tagged
    `arborl.origin=seed` with its lineage (parent `none`), and point `champion` at it. Returns the version.

    How a registry starts from a base model: `flows/deployments.py:retrain` then trains from the champion."""
    client = _client(cfg)
    name = cfg.registry.model_name
    # a seed is trained on no data of this project: no snapshot, no data URI
    tags = {ORIGIN_TAG: "seed", **lineage_tags(cfg, None, model_uri), DATA_SNAPSHOT_TAG: "none",
            DATA_URI_TAG: "none", MODEL_URI_TAG: model_uri}
    run = client.create_run(_experiment_id(client, cfg), run_name=f"seed-{name}", tags=tags)
    run_id = run.info.run_id
    try:
        version = register_final_model(cfg, run_id, model_uri, {}, tags, alias=CHAMPION)
        client.update_model_version(name, version, description=f"Seeded as {CHAMPION} from {model_uri}.")
        client.set_model_version_tag(name, version, "gate.champion_after", version)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return version


def champion_version(cfg: Config) -> str | None:
    """The version `champion` of `registry.model_name` points at, or None (no such alias or model yet)."""
    found = _alias(_client(cfg), cfg.registry.model_name, CHAMPION)
    return None if found is None else str(found.version)


def download_champion(cfg: Config, version: str, out: str) -> str:
    """The registered version `version` of `registry.model_name` as a plain Hugging Face model directory at
    `out` (local or remote); an existing complete copy (its `_source.json`, written last) is kept. Returns
    `out`."""
    name = cfg.registry.model_name
    source = {"model_uri": f"models:/{name}/{version}"}
    marker = storage.join(out, "_source.json")
    if storage.exists(marker) and storage.read_json(marker) == source:
        return out
    client = _client(cfg)
    with tempfile.TemporaryDirectory() as tmp, _fluent_uri(cfg):
        local = download_version(client, name, version, Path(tmp) / "download")
        storage.remove(out)
        if storage.is_local(out):
            shutil.copytree(local, storage.filesystem(out)[1])
        else:
            storage.upload_dir(local, out)
    storage.write_json(marker, source)
    return out


def _alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such alias (or model) yet
        return None


def download_version(client, name: str, version: str, dst: Path) -> Path:
    """Download a registered version and assemble a plain Hugging Face model directory from it
    (the flavor keeps weights under `model/` and the tokenizer under `components/tokenizer/`)."""
    import mlflow

    root = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst)))
    model_dir = root / "model"
    tokenizer_dir = root / "components" / "tokenizer"
    if tokenizer_dir.is_dir():
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, model_dir / f.name)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"registered model {name} v{version}: no model/config.json in its artifacts")
    return model_dir


def version_tags(cfg: Config, version: str) -> dict[str, Any]:
    """The tags of one registered version (for reports and tests)."""
    return dict(_client(cfg).get_model_version(cfg.registry.model_name, version).tags)
