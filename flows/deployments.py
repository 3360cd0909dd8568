"""The deployable flows (prefect.yaml points its deployments at these entrypoints):

* `flows/deployments.py:train` (`arborl-train`): one pipeline run of a config file.
* `flows/deployments.py:retrain` (`arborl-retrain`): scheduled retraining — the latest (or a named) data
  snapshot, trained from the registry's current `champion`, ending in the gated promotion of the new
  `challenger`. Its run name is fixed by (config run name, snapshot, parent version), so running the same retrain
  again resumes that run instead of starting another.

Both take a config file path (relative paths are tried against the working directory, then the repository) and
`key.sub=value` overrides, as `arborl run` does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow

from arborl.components.artifacts import storage
from arborl.components.config import DEFAULT_CONFIG, Config, load_config
from arborl.components.tracking.tags import DATA_SNAPSHOT_TAG, PARENT_MODEL_URI_TAG, PARENT_VERSION_TAG
from arborl.flows.pipeline import train_pipeline

REPO_ROOT = DEFAULT_CONFIG.parent.parent
PARENT_MODEL_DIR = "parent_model"  # the champion the retrain started from, under the run's root


def config_path(config: str) -> Path:
    """`config` as given when it exists (relative to the working directory), else relative to the repository
    (a worker whose working directory is elsewhere); the given path when neither exists (load_config names it)."""
    path = Path(config)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).is_file():
        return REPO_ROOT / path
    return path


def load(config: str, overrides: list[str] | None = None, iterations: int | None = None) -> Config:
    """The config file with its overrides (and `run.iterations`), validated; ConfigError names the file and key."""
    extra = [f"run.iterations={iterations}"] if iterations is not None else []
    return load_config(config_path(config), [*(overrides or []), *extra])


@flow(name="arborl-train")
def train(config: str = "configs/tiny.yaml", overrides: list[str] | None = None) -> dict:
    """Run the training pipeline (flows/pipeline.py `train_pipeline`, as a subflow) for a config file with
    `key.sub=value` overrides; returns its summary."""
    cfg = load(config, overrides)
    return train_pipeline(cfg.model_dump(mode="json"), str(config_path(config)))


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", part).strip("._-") or "x"


def retrain_run_name(name: str, snapshot: str, parent_version: str | None) -> str:
    """`<name>-<snapshot>-from-v<N>` (`-from-none` without a champion; no snapshot part without
    data.snapshot_root): the same inputs always give the same run."""
    parts = [name] if snapshot == "none" else [name, _safe(snapshot)]
    return "-".join([*parts, f"from-v{parent_version}" if parent_version else "from-none"])


def plan_retrain(cfg: Config, parent_version: str | None) -> tuple[Config, dict[str, str]]:
    """The run config and lineage of a retrain of `cfg` (its snapshot already resolved) from registered version
    `parent_version` of `registry.model_name` (None: from the config's own start model)."""
    from arborl.components.data.snapshots import snapshot_name

    run_name = retrain_run_name(cfg.run.name, snapshot_name(cfg.data), parent_version)
    data = cfg.model_dump(mode="json")
    data["run"]["name"] = run_name
    lineage = {PARENT_VERSION_TAG: parent_version or "none"}
    if parent_version is not None:
        data["run"]["warmstart_from"] = None
        data["model"]["path"] = storage.child(cfg.run.output_root, run_name, PARENT_MODEL_DIR)
        data["warmstart"]["enabled"] = False
        lineage[PARENT_MODEL_URI_TAG] = f"models:/{cfg.registry.model_name}/{parent_version}"
    return Config.model_validate(data), lineage


@flow(name="arborl-retrain")
def retrain(config: str, overrides: list[str] | None = None, iterations: int | None = None) -> dict[str, Any]:
    """Retrain on the data snapshot `data.snapshot` (`latest`: the newest, resolved once here) starting from the
    registry's `champion` of `registry.model_name` (downloaded as the run's `model.path`, no warm start) or, with
    no champion yet, from the config's own start model; then the pipeline registers the result as `challenger`
    and runs the gated promotion.

    A challenger that is not promoted leaves `champion` as it was; the flow run still completes, with the
    decision in its return value (`registry.decision`) and the `arborl.challenger.rejected` event emitted."""
    from arborl.components.data.snapshots import resolve_snapshot
    from arborl.components.registry.store import champion_version, download_champion

    cfg = resolve_snapshot(load(config, overrides, iterations))
    if not (cfg.registry.enabled and cfg.tracking.enabled):
        raise ValueError(f"{config}: retrain needs registry.enabled and tracking.enabled (it trains from and "
                         "promotes to the model registry)")
    parent = champion_version(cfg)
    run_cfg, lineage = plan_retrain(cfg, parent)
    if parent is not None:
        download_champion(cfg, parent, run_cfg.model.path)
    summary = train_pipeline(run_cfg.model_dump(mode="json"), str(config_path(config)), lineage)
    registry = summary.get("registry") or {}
    return {**summary, "retrain": {"run_name": run_cfg.run.name, "parent_version": parent or "none",
                                   "data_snapshot": summary["lineage"][DATA_SNAPSHOT_TAG],
                                   "champion_after": registry.get("champion_after")}}
