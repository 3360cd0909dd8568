"""warmstart: build the tokenizer and tiny model, then supervised training on imperfect demonstrations.

With `warmstart.enabled` false the stage trains nothing and reads nothing of the world: it saves `model.path` as
the run's iteration-0 model. Either way the model is saved in `train.save_dtype`, with its full-precision master
weights as training state (`training_state.write_training_state`) when that dtype rounds them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from arborl.components.artifacts import schemas, storage
from arborl.components.config import Config
from arborl.components.envs.demos import Segment, build_demonstrations, gold_chain_tokens
from arborl.components.envs.world import World, vocabulary
from arborl.components.stages.base import device, load_retriever, run_stage
from arborl.components.stages.contract import StageResult, WarmstartInputs
from arborl.components.training import warm
from arborl.components.training.models import build_model, build_tokenizer, load_policy, save_policy
from arborl.components.training.training_state import master_weights, write_training_state
from arborl.components.training.warmstart import supervised_train, tokenize_demo

SECTIONS = ("world", "model", "warmstart", "search")  # demonstrations search with the configured retriever

def save_start_model(cfg: Config, model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out: str) -> None:
    """Save the run's iteration-0 model at `out` in `train.save_dtype`, with master weights when rounded."""
    master = master_weights(dict(model.named_parameters(remove_duplicate=False)), cfg.train.save_dtype)
    write_training_state(out, None, master)
    save_policy(model, tokenizer, out, dtype=cfg.train.save_dtype)
    if warm.ENABLED["on"]:  # an in-process run: the stages after it take it from memory
        warm.keep_trained(out, model, tokenizer, None, master, cfg.train.save_dtype)


def given_model(cfg: Config, out: str) -> tuple[dict[str, str], dict[str, Any]]:
    """No warm start: `model.path`, loaded as it is, becomes the model directory `out`."""
    if cfg.model.path is None:
        raise ValueError("warmstart.enabled is false but model.path is null: set model.path")
    model, tokenizer = load_policy(cfg.model.path, "cpu", cfg.storage.cache_max_gb)
    save_start_model(cfg, model, tokenizer, out)
    return {"model": out}, {"trained": 0, "steps": 0, "demos": 0, "source": cfg.model.path,
                            "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}


def load_world(world_uri: str) -> World:
    """The synthetic world prepared at `world_uri` (its world.json and facts)."""
    facts = schemas.read(storage.join(world_uri, schemas.FACTS_FILE), schemas.FACTS).to_pylist()
    return World.from_artifacts(storage.read_json(storage.join(world_uri, schemas.WORLD_FILE)), facts)


def gold_chain_unit(cfg: Config, world_uri: str) -> float:
    """`budget.chain_unit: gold`: mean generated tokens of a gold chain over the validation questions of the world
    at `world_uri`, in the tokens of the model the warm start builds for it."""
    if cfg.data.source != "synthetic" or cfg.model.path:
        raise ValueError("budget.chain_unit 'gold' needs the synthetic world and its built model (data.source "
                         "'synthetic', model.path null): use 'warmstart'")
    world = load_world(world_uri)
    return gold_chain_tokens(world, load_retriever(world_uri, cfg), schemas.read_prompts(world_uri, "val"),
                             build_tokenizer(vocabulary(world)))


def demonstrations(cfg: Config, world_uri: str) -> tuple[World, list[list[Segment]]]:
    """The prepared world at `world_uri` and the warm start's demonstration episodes on its train questions."""
    world = load_world(world_uri)
    episodes = build_demonstrations(world, load_retriever(world_uri, cfg), schemas.read_prompts(world_uri, "train"),
                                    cfg.warmstart, cfg.run.seed)
    return world, episodes


def warm_start(cfg: Config, inputs: dict[str, str], out: str, on_step: Callable | None = None
               ) -> tuple[dict[str, str], dict[str, Any]]:
    """Supervised training of a fresh (or `model.path`) policy on demonstrations of the world's train
    questions; the model directory is `out`."""
    given = WarmstartInputs.from_uris(inputs)
    world, episodes = demonstrations(cfg, given.world)
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
    save_start_model(cfg, model, tokenizer, out)
    metrics.update({
        "trained": 1,
        "demos": len(demos),
        "demo_tokens_mean": sum(len(d[0]) for d in demos) / len(demos),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
    })
    return {"model": out}, metrics


def run(cfg: Config, inputs: dict[str, str], out: str, on_step=None) -> StageResult:
    work = partial(warm_start, cfg, inputs, out, on_step) if cfg.warmstart.enabled else partial(given_model, cfg, out)
    return run_stage("warmstart", cfg, inputs, out, SECTIONS, work)
