"""sample: grow Tree-GRPO trees (or chains) for this iteration's training prompts → nodes.parquet."""

from __future__ import annotations

import random

from components import schemas, storage
from components.config import Config
from components.models import load_policy, prompt_ids
from components.sampling.agent import SearchEnv
from components.sampling.backend import HFBackend
from components.sampling.budget import budget
from components.sampling.tree import node_rows, sample_trees
from components.stages.base import StageResult, device, load_prompts, load_retriever, run_stage


def iteration_prompts(cfg: Config, world_uri: str, iteration: int) -> list[dict]:
    """The training prompts of one iteration: a seeded draw without replacement from the train split."""
    train = load_prompts(world_uri, "train")
    rng = random.Random(f"{cfg.run.seed}-prompts-{iteration}")
    return rng.sample(train, min(cfg.sampling.prompts_per_iteration, len(train)))


def run(cfg: Config, inputs: dict[str, str], out: str, iteration: int) -> StageResult:
    def body():
        if cfg.sampling.backend == "vllm":  # runs where vllm is installed: the Dockerfile's `sampler` image
            from components.sampling.vllm_backend import VLLMBackend

            backend, tokenizer = VLLMBackend.from_model_dir(inputs["model"], seed=cfg.run.seed)
        else:
            model, tokenizer = load_policy(inputs["model"], device(cfg))
            backend = HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
        env = SearchEnv(load_retriever(inputs["world"], cfg), tokenizer)
        rows = iteration_prompts(cfg, inputs["world"], iteration)
        prompts = [(r["prompt_id"], prompt_ids(tokenizer, r["prompt"])) for r in rows]
        trees = sample_trees(backend, env, prompts, cfg.sampling, cfg.agent, seed=cfg.run.seed * 100_003 + iteration)
        nodes = node_rows(trees, policy_version=iteration - 1)
        schemas.write(nodes, schemas.NODES, storage.join(out, "nodes.parquet"))

        per_prompt, metrics = budget(trees)
        metrics["nodes"] = len(nodes)
        storage.write_json(storage.join(out, "prompt_stats.json"), per_prompt)
        outputs = {"nodes": storage.join(out, "nodes.parquet"), "prompt_stats": storage.join(out, "prompt_stats.json")}
        return outputs, metrics

    return run_stage("sample", cfg, inputs, out, ("sampling", "agent"), body, iteration=iteration)
