"""Where a run's records go: MLflow tracking, storage, the tree viewer and the model registry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from arborl.components.config.base import Strict


class TrackingConfig(Strict):
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; null uses $MLFLOW_TRACKING_URI or sqlite:///<output_root>/mlflow.db."
    )
    experiment: str = Field("arborl", description="MLflow experiment name.")
    enabled: bool = Field(True, description="Log to MLflow at all.")
    system_metrics: bool = Field(
        True, description="Log MLflow system metrics (system/*: CPU, memory, disk, network, GPU) for the run, "
        "sampled every 10 s ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it).",
    )
    update_every_s: float = Field(
        5.0, ge=0, le=3600, description="Seconds between updates of a run's live records: the batched MLflow "
        "metrics and the Prefect progress and iteration-table artifacts. Evaluated iterations and the last one always "
        "update; 0 updates after every iteration.",
    )


class StorageConfig(Strict):
    cache_max_gb: float = Field(
        20.0, ge=0, description="Most GB of local copies of remote (s3://) model directories kept in the cache "
        "($TMPDIR/arborl-cache); beyond it the least recently used copies are deleted. Optimizer state is never "
        "copied. 0 keeps only the copies in use.",
    )


class ViewerConfig(Strict):
    max_prompts: int = Field(
        16, ge=0, description="Prompts whose trees the label stage draws into trees.html; 0 writes no viewer."
    )


class RegistryConfig(Strict):
    enabled: bool = Field(True, description="Register the final model and run the gated promotion (needs tracking).")
    model_name: str = Field("arborl-tiny", description="Registered model name in the MLflow model registry.")
    gate_metric: Literal["em", "f1", "reward", "em_sampled", "f1_sampled", "reward_sampled"] = Field(
        "em", description="Per-question score the gate compares: greedy em/f1/reward or their mean over samples."
    )
    margin: float = Field(
        0.0, description="Promote only when the bootstrap lower bound of the paired improvement exceeds this."
    )
    split: Literal["val", "test"] = Field(
        "val", description="Questions both models are evaluated on for the gate (test metrics are only reported)."
    )


# The pipeline's stage names (components/stages STAGES holds the same keys); orchestration's per-stage dicts
# accept these and `default`.
