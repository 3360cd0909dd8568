"""warmstart: build the tokenizer and tiny model, then supervised training on imperfect demonstrations."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from arborl.components import schemas, storage
from arborl.components.config import Config
from arborl.components.envs.demos import build_demonstrations
from arborl.components.envs.world import World, vocabulary
from arborl.components.models import build_model, build_tokenizer, load_policy, save_policy
from arborl.components.stages.base import StageResult, device, load_prompts, load_retriever, run_stage
from arborl.components.training.warmstart import supervised_train, tokenize_demo


def warm_start(cfg: Config, inputs: dict[str, str], out: str, on_step: Callable | None = None
               ) -> tuple[dict[str, str], dict[str, Any]]:
    """Supervised training of a fresh (or `model.path`) policy on demonstrations of the world's train
    questions; the model directory is `out`."""
    world_uri = inputs["world"]
    facts = schemas.read(storage.join(world_uri, schemas.FACTS_FILE), schemas.FACTS).to_pylist()
    world = World.from_artifacts(storage.read_json(storage.join(world_uri, schemas.WORLD_FILE)), facts)
    episodes = build_demonstrations(world, load_retriever(world_uri, cfg), load_prompts(world_uri, "train"),
                                    cfg.warmstart, cfg.run.seed)
    if cfg.model.path:
        model, tokenizer = load_policy(cfg.model.path, device(cfg), cfg.storage.cache_max_gb)
    else:
        tokenizer = build_tokenizer(vocabulary(world))
        model = build_model(cfg.model, tokenizer, cfg.run.seed).to(device(cfg))
    demos = [tokenize_demo(tokenizer, ep) for ep in episodes]
    unk = sum(ids.count(tokenizer.unk_token_id) for ids, _ in demos)
    if unk:
        raise ValueError(f"warmstart: {unk} demonstration tokens are unknown to the tokenizer")
    metrics = supervised_train(model, demos, cfg.warmstart, tokenizer.pad_token_id, cfg.run.seed, on_step)
    save_policy(model, tokenizer, out)
    metrics.update({
        "demos": len(demos),
        "demo_tokens_mean": sum(len(d[0]) for d in demos) / len(demos),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
    })
    return {"model": out}, metrics


def run(cfg: Config, inputs: dict[str, str], out: str, on_step=None) -> StageResult:
    return run_stage("warmstart", cfg, inputs, out, ("world", "model", "warmstart"),
                     partial(warm_start, cfg, inputs, out, on_step))
