"""registry.promotion against a real SQLite MLflow store, with the evaluator handed in: made-up per-question
scores, so no model runs and no stage is imported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arborl.components.artifacts import schemas, storage
from arborl.components.registry.gate import CHALLENGER, CHAMPION, INCOMPLETE
from arborl.components.registry.promotion import DECISION_FILE, promote
from arborl.components.registry.store import champion_version, register_final_model, version_tags
from arborl.components.tracking.tags import RUN_ROOT_TAG, WARMSTART_MODEL_TAG, WORLD_TAG

QUESTIONS = [f"q{i}" for i in range(30)]


def _world(tmp_path: Path) -> str:
    """A prepare output whose prompts are QUESTIONS in the val split (and one test question)."""
    world = str(tmp_path / "world")
    rows = [{"prompt_id": q, "data_source": "synthetic", "prompt": q, "messages": "[]", "ability": "qa",
             "reward_model": "{}", "ground_truth": ["a"], "split": split, "extra_info": "{}"}
            for q, split in [*((q, "val") for q in QUESTIONS), ("t0", "test")]]
    schemas.write(rows, schemas.PROMPTS, storage.join(world, schemas.PROMPTS_FILE))
    return world


def _rows(em: float, split: str) -> list[dict]:
    """Greedy eval rows (schemas.EVAL) with the same EM on every question."""
    return [{"prompt_id": q, "split": split, "data_source": "synthetic", "hops": 1, "mode": "greedy", "sample": 0,
             "reward": em, "em": em, "f1": em, "answer": "a", "valid_format": True, "tool_calls": 1,
             "generated_tokens": 4, "text": "t"} for q in QUESTIONS]


def _never(*args, **kwargs):
    raise AssertionError("the evaluator was not expected to be called")


def test_promote_refuses_a_run_root_outside_the_output_root(tracked_run, tmp_path):
    cfg, run_id, model_dir, _, _ = tracked_run
    version = register_final_model(cfg, run_id, model_dir, {"test_em": 0.5},
                                   extra_tags={RUN_ROOT_TAG: str(tmp_path / "elsewhere")})
    with pytest.raises(ValueError, match=r"arborl.run_root=.*elsewhere.* lies outside run.output_root"):
        promote(cfg, _never)
    assert not (tmp_path / "elsewhere").exists() and version == "1"


def test_promote_gates_with_the_evaluator_it_is_handed(tracked_run, tmp_path):
    """The challenger (downloaded from the registry) beats its warm start on every val question: promoted, with the
    decision in its tags and under the run root; the evaluator saw both models on the world's val questions."""
    cfg, run_id, model_dir, client, _ = tracked_run
    world, run_root = _world(tmp_path), str(tmp_path / "runs" / "reg")
    tags = {WORLD_TAG: world, WARMSTART_MODEL_TAG: "warm-start-uri", RUN_ROOT_TAG: run_root}
    version = register_final_model(cfg, run_id, model_dir, {"test_em": 0.5}, tags)
    calls = []

    def evaluate(cfg, model_uri: str, world_uri: str, splits: tuple[str, ...]):
        calls.append((model_uri, world_uri, splits))
        return _rows(0.0 if model_uri == "warm-start-uri" else 1.0, splits[0]), {}

    result = promote(cfg, evaluate)
    assert result.decision.promoted and result.baseline == "warm start" and result.decision.n == len(QUESTIONS)
    assert result.champion_before is None and result.champion_after == version
    evaluated = {uri: rest for uri, *rest in calls}
    assert evaluated.pop("warm-start-uri") == [world, ("val",)]
    [(challenger_dir, args)] = evaluated.items()
    assert args == [world, ("val",)] and Path(challenger_dir).name == "model"
    assert str(client.get_model_version_by_alias(cfg.registry.model_name, CHAMPION).version) == version
    assert str(client.get_model_version_by_alias(cfg.registry.model_name, CHALLENGER).version) == version
    assert version_tags(cfg, version)["gate.decision"] == "promote"
    decision = json.loads((Path(run_root) / f"promote_v{version}" / DECISION_FILE).read_text())
    assert decision["decision"] == "promote" and decision["split"] == "val" and decision["baseline"] == "warm start"
    again = promote(cfg, _never)  # the same version is already champion: nothing to evaluate
    assert not again.decision.promoted and again.baseline == "itself"


def test_a_failing_evaluator_never_promotes(tracked_run, tmp_path):
    cfg, run_id, model_dir, client, _ = tracked_run
    tags = {WORLD_TAG: _world(tmp_path), WARMSTART_MODEL_TAG: "warm-start-uri"}
    version = register_final_model(cfg, run_id, model_dir, {"test_em": 0.5}, tags)

    def broken(cfg, model_uri, world_uri, splits):
        raise RuntimeError("no GPU")

    result = promote(cfg, broken)
    assert result.decision.decision == INCOMPLETE
    assert "evaluation failed: RuntimeError: no GPU" in result.decision.reason
    assert result.out is None and version_tags(cfg, version)["gate.decision"] == INCOMPLETE
    assert champion_version(cfg) is None
