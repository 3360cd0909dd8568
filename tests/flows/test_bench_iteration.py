"""`arborl bench iteration`'s before/after runs on the micro config: real in-process flows from one warm start."""

from __future__ import annotations

from pathlib import Path

from arborl.components.bench import iteration
from arborl.components.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_warm_run_reads_no_model_and_writes_less_than_the_cold_one(tmp_path, prefect_server):
    cfg = load_config(ROOT / "configs" / "micro.yaml", ["tracking.enabled=false"])
    result = iteration.bench_iteration(cfg, str(tmp_path), iterations=2, checkpoint_every=2)
    # "after" reads the shared warm start once, then takes every model from memory; "before" reads each one
    assert result["before_model_loads_disk"] > 2 and result["after_model_loads_disk"] == 1
    assert result["after_model_loads_memory"] > 0
    # iteration 1 of "after" writes no optimizer.pt: the train outputs average less
    assert result["after_train_bytes_per_iteration"] < result["before_train_bytes_per_iteration"]
    for when in ("before", "after"):
        stages = sum(result[f"{when}_{s}_seconds_per_iteration"] for s in iteration.ITERATION_STAGES)
        assert 0 < stages <= result[f"{when}_seconds_per_iteration"]
        # the split: the train stage's compute is what its saves and manifests leave; task runs cost something
        train = result[f"{when}_train_seconds_per_iteration"]
        assert 0 < result[f"{when}_train_compute_per_iteration"] < train
        assert 0 < result[f"{when}_model_saves_per_iteration"] < train
        assert result[f"{when}_artifact_writes_per_iteration"] > 0 and result[f"{when}_manifests_per_iteration"] > 0
        assert result[f"{when}_prefect_task_runs_per_iteration"] > 0
        assert result[f"{when}_tracking_per_iteration"] < 0.01  # tracking.enabled=false: no MLflow request
        outside = result[f"{when}_outside_stages_per_iteration"]
        assert result[f"{when}_other_outside_per_iteration"] == outside - sum(
            result[f"{when}_{k}_per_iteration"] for k in ("prefect_task_runs", "tracking", "dashboards"))
    assert result["speedup"] == result["before_seconds_per_iteration"] / result["after_seconds_per_iteration"]
