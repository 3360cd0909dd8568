"""evaluate: greedy EM/F1 and sampled pass@k on the fixed val and test questions → eval.parquet."""

from __future__ import annotations

from arborl.components import schemas, storage
from arborl.components.config import Config
from arborl.components.evaluation.evaluate import evaluate_policy
from arborl.components.models import load_policy
from arborl.components.sampling.agent import SearchEnv
from arborl.components.sampling.backend import HFBackend
from arborl.components.stages.base import StageResult, device, load_prompts, load_retriever, run_stage


def evaluation_seed(cfg: Config) -> int:
    """The seed every evaluation of a config uses, so two models see the same sampling noise stream."""
    return cfg.run.seed + 17


def evaluate_model(cfg: Config, model_uri: str, world_uri: str, splits: tuple[str, ...] = ("val", "test")
                   ) -> tuple[list[dict], dict[str, float]]:
    """Evaluate the model directory at `model_uri` on the world's questions of `splits`: (rows, metrics)."""
    model, tokenizer = load_policy(model_uri, device(cfg))
    env = SearchEnv(load_retriever(world_uri, cfg), tokenizer)
    backend = HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.evaluate.batch_size)
    prompts = [p for split in splits for p in load_prompts(world_uri, split)]
    return evaluate_policy(backend, env, prompts, cfg.agent, cfg.verify, cfg.evaluate.temperature,
                           seed=evaluation_seed(cfg), pass_k=tuple(cfg.evaluate.pass_k),
                           bootstrap=cfg.evaluate.bootstrap)


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    def body():
        rows, metrics = evaluate_model(cfg, inputs["model"], inputs["world"])
        uri = storage.join(out, "eval.parquet")
        schemas.write(rows, schemas.EVAL, uri)
        return {"eval": uri}, metrics

    return run_stage("evaluate", cfg, inputs, out, ("evaluate", "agent", "verify"), body)
