"""Registry and gated promotion end to end: real tiny models, a real SQLite-backed MLflow registry, a real
Prefect run. The pipeline registers its final model as `challenger`; then models of known quality (a
random init, a small and a larger searching policy, all made by the real warm-start stage) go through
`promote` so that "worse", "better" and "incomplete" are deterministic."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlflow import MlflowClient
from typer.testing import CliRunner

from arborl.components.artifacts import retention, storage
from arborl.components.config import load_config
from arborl.components.registry.gate import CHALLENGER, CHAMPION
from arborl.components.registry.promotion import promote
from arborl.components.registry.store import register_final_model
from arborl.components.stages import STAGES
from arborl.components.stages.evaluate import evaluate_model
from arborl.flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "configs" / "micro.yaml")
# 1-hop questions and more demonstrations, so that policies of different strength differ clearly in EM; 40 val
# questions for the gate (registry.split: val)
EASY = ["world.hop_mix={1: 1.0}", "world.num_train=400", "warmstart.num_demos=1000", "world.num_test=40",
        "world.num_val=40", "run.iterations=1"]


def test_pipeline_registers_challenger_and_the_gate_moves_champion_only_when_better(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from arborl.flows.pipeline import train_pipeline

    overrides = [f"run.output_root={tmp_path / 'runs'}", *EASY]
    cfg = load_config(MICRO, overrides)
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    summary = train_pipeline(cfg.model_dump(mode="json"))
    # registering used MLflow's global (fluent) API but left it as it was for later runs in this process
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before

    # 1. the run registered version 1 with alias challenger, tagged with run, config hash and eval metrics
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    name = cfg.registry.model_name
    v1 = client.get_model_version_by_alias(name, CHALLENGER)
    assert str(v1.version) == "1" and summary["registry"]["version"] == "1"
    # recorded as registered first, so that run.keep_iterations never prunes it
    assert retention.registered(str(tmp_path / "runs" / "micro")) == [summary["model"]] == [
        v1.tags["arborl.model_uri"]]
    assert v1.run_id == summary["mlflow_run_id"] == v1.tags["arborl.run_id"]
    assert v1.tags["arborl.config_hash"] == cfg.section_hash()
    assert float(v1.tags["eval.test_em"]) == summary["final"]["test_em"]  # reported beside the val metrics
    assert float(v1.tags["eval.val_em"]) == summary["final"]["val_em"] and v1.tags["gate.split"] == "val"
    # its promotion against the warm start ran to a complete decision, recorded in tags, on disk and in Prefect
    assert v1.tags["gate.decision"] in ("promote", "reject") and v1.tags["gate.n"] == "40"
    assert v1.tags["gate.baseline_model"] == "warm start"
    decision = json.loads((tmp_path / "runs" / "micro" / "promote_v1" / "decision.json").read_text())
    assert decision["decision"] == v1.tags["gate.decision"] == summary["registry"]["decision"]["decision"]
    assert (tmp_path / "runs" / "micro" / "promote_v1" / "challenger_eval.parquet").exists()
    with get_client(sync_client=True) as prefect:
        key = ArtifactFilterKey(any_=["micro-promotion-arborl-micro"])  # <run>-promotion-<model>
        # the newest: earlier flow tests of the session may have promoted an arborl-micro of their own
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=key), sort=ArtifactSort.CREATED_DESC)
    assert artifacts and "Promotion of arborl-micro v1" in artifacts[0].data

    # 2. models of known quality, from the real warm-start stage on the run's world
    world = str(tmp_path / "runs" / "micro" / "prepare")
    models = {}
    clean = ["warmstart.steps=200", "warmstart.batch_size=16", "warmstart.lr=0.01", "warmstart.early_answer_prob=0.0",
             "warmstart.sloppy_query_prob=0.0"]
    for label, extra in {
        "random": ["warmstart.steps=0"],  # test EM 0
        "small": clean,  # measured test EM 0.35 on this world
        "large": [*clean, "model.hidden_size=64", "model.intermediate_size=128"],  # measured 0.85
    }.items():
        models[label] = STAGES["warmstart"](load_config(MICRO, overrides + extra), {"world": world},
                                            str(tmp_path / "models" / label)).out

    gate_cfg = load_config(MICRO, [*overrides, "registry.model_name=gated"])
    exp = client.get_experiment_by_name(gate_cfg.tracking.experiment).experiment_id

    def register(model: str) -> str:
        run_id = client.create_run(exp).info.run_id
        tags = {"arborl.world": world, "arborl.warmstart_model": models["random"],
                "arborl.run_root": str(tmp_path / "runs" / "gated")}  # inside run.output_root
        return register_final_model(gate_cfg, run_id, model, {"test_em": 0.0}, tags)

    def champion() -> str | None:
        try:
            return str(client.get_model_version_by_alias("gated", CHAMPION).version)
        except Exception:
            return None

    # first model: becomes champion because it beats its warm start (the random init)
    assert register(models["small"]) == "1"
    first = promote(gate_cfg, evaluate_model)
    assert first.decision.decision == "promote" and first.baseline == "warm start", first.decision
    assert first.decision.delta > 0 and first.decision.ci_low > 0 and champion() == "1"

    # a worse challenger (through the CLI) does not move champion; the rejection is in its tags
    assert register(models["random"]) == "2"
    res = CliRunner().invoke(app, ["promote", "--config", MICRO, *overrides, "registry.model_name=gated"])
    assert res.exit_code == 0, res.output
    assert "reject" in res.output and champion() == "1"
    tags = client.get_model_version("gated", "2").tags
    assert tags["gate.decision"] == "reject" and tags["gate.baseline_model"] == "champion v1"
    assert float(tags["gate.delta"]) < 0 and tags["gate.n"] == "40"

    # a better challenger moves champion
    assert register(models["large"]) == "3"
    better = promote(gate_cfg, evaluate_model)
    assert better.decision.decision == "promote" and better.champion_before == "1", better.decision
    assert better.decision.challenger > better.decision.baseline and champion() == "3"
    assert str(client.get_model_version_by_alias("gated", CHALLENGER).version) == "3"

    # a challenger whose evaluation fails (weights gone from the artifact store) is incomplete: no promotion
    assert register(models["large"]) == "4"
    source = client.get_model_version("gated", "4").source  # models:/<logged model id>
    location = client.get_logged_model(source.split("/")[-1]).artifact_location
    Path(storage.filesystem(location)[1], "model", "model.safetensors").unlink()
    broken = promote(gate_cfg, evaluate_model)
    assert broken.decision.decision == "incomplete" and "challenger evaluation failed" in broken.decision.reason
    assert champion() == "3" and client.get_model_version("gated", "4").tags["gate.decision"] == "incomplete"
