"""warmstart: build the tokenizer and tiny model, then supervised training on imperfect demonstrations."""

from __future__ import annotations

import random

from arborl.components import schemas, storage
from arborl.components.config import Config
from arborl.components.envs.demos import demonstration
from arborl.components.envs.world import RELATIONS, World, vocabulary
from arborl.components.models import build_model, build_tokenizer, load_policy, save_policy
from arborl.components.stages.base import StageResult, device, load_prompts, load_retriever, run_stage
from arborl.components.training.warmstart import supervised_train, tokenize_demo


def run(cfg: Config, inputs: dict[str, str], out: str, on_step=None) -> StageResult:
    world_uri = inputs["world"]

    def body():
        facts = schemas.read(storage.join(world_uri, "facts.parquet"), schemas.FACTS).to_pylist()
        world = World.from_artifacts(storage.read_json(storage.join(world_uri, "world.json")), facts)
        retriever = load_retriever(world_uri, cfg)
        fact_index = {f["text"]: (f["subject"], f["relation"], f["object"]) for f in facts}
        by_type = {kind: world.entities(kind) for kind in {t for _, _, t in RELATIONS.values()}}
        train = load_prompts(world_uri, "train")
        rng = random.Random(cfg.run.seed)
        ws = cfg.warmstart
        episodes = [
            demonstration(rng.choice(train), retriever, fact_index, by_type, rng, ws.early_answer_prob,
                          ws.sloppy_query_prob)
            for _ in range(ws.num_demos)
        ]
        if cfg.model.path:
            model, tokenizer = load_policy(cfg.model.path, device(cfg))
        else:
            tokenizer = build_tokenizer(vocabulary(world))
            model = build_model(cfg.model, tokenizer, cfg.run.seed).to(device(cfg))
        demos = [tokenize_demo(tokenizer, ep) for ep in episodes]
        unk = sum(ids.count(tokenizer.unk_token_id) for ids, _ in demos)
        if unk:
            raise ValueError(f"warmstart: {unk} demonstration tokens are unknown to the tokenizer")
        metrics = supervised_train(model, demos, ws, tokenizer.pad_token_id, cfg.run.seed, on_step)
        save_policy(model, tokenizer, out)
        metrics.update({
            "demos": len(demos),
            "demo_tokens_mean": sum(len(d[0]) for d in demos) / len(demos),
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
        })
        return {"model": out}, metrics

    return run_stage("warmstart", cfg, inputs, out, ("world", "model", "warmstart"), body)
