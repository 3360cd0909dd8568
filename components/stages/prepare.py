"""prepare: build the embedded world — fact corpus and train/val/test questions split by subject."""

from __future__ import annotations

from arborl.components import schemas, storage
from arborl.components.config import Config
from arborl.components.envs.world import build_world, make_questions
from arborl.components.stages.base import StageResult, run_stage


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    def body():
        world = build_world(cfg.world, cfg.run.seed)
        facts = world.fact_rows()
        prompts = []
        for split, n in (("train", cfg.world.num_train), ("val", cfg.world.num_val), ("test", cfg.world.num_test)):
            prompts += make_questions(world, cfg.world, cfg.run.seed, split, n)
        schemas.write(facts, schemas.FACTS, storage.join(out, "facts.parquet"))
        schemas.write(prompts, schemas.PROMPTS, storage.join(out, "prompts.parquet"))
        storage.write_json(storage.join(out, "world.json"), world.to_json())
        counts = {s: sum(p["split"] == s for p in prompts) for s in ("train", "val", "test")}
        return (
            {"facts": storage.join(out, "facts.parquet"), "prompts": storage.join(out, "prompts.parquet"),
             "world": storage.join(out, "world.json")},
            {"facts": len(facts), "people": len(world.people), **{f"{k}_prompts": v for k, v in counts.items()}},
        )

    return run_stage("prepare", cfg, inputs, out, ("world",), body)
