"""prepare: build the embedded world — fact corpus and train/val/test questions split by subject."""

from __future__ import annotations

from functools import partial
from typing import Any

from arborl.components import schemas, storage
from arborl.components.config import Config
from arborl.components.envs.world import build_world, make_questions
from arborl.components.stages.base import StageResult, run_stage


def prepare_world(cfg: Config, inputs: dict[str, str], out: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Build the world from `cfg.world` and the run's seed; write its facts, questions and entities under `out`."""
    world = build_world(cfg.world, cfg.run.seed)
    facts = world.fact_rows()
    prompts = []
    for split, n in (("train", cfg.world.num_train), ("val", cfg.world.num_val), ("test", cfg.world.num_test)):
        prompts += make_questions(world, cfg.world, cfg.run.seed, split, n)
    outputs = {"facts": storage.join(out, schemas.FACTS_FILE), "prompts": storage.join(out, schemas.PROMPTS_FILE),
               "world": storage.join(out, schemas.WORLD_FILE)}
    schemas.write(facts, schemas.FACTS, outputs["facts"])
    schemas.write(prompts, schemas.PROMPTS, outputs["prompts"])
    storage.write_json(outputs["world"], world.to_json())
    counts = {s: sum(p["split"] == s for p in prompts) for s in ("train", "val", "test")}
    return outputs, {"facts": len(facts), "people": len(world.people),
                     **{f"{k}_prompts": v for k, v in counts.items()}}


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    return run_stage("prepare", cfg, inputs, out, ("world",), partial(prepare_world, cfg, inputs, out))
