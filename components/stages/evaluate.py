"""evaluate: greedy EM/F1 and sampled pass@k on the fixed val and test questions → eval.parquet."""

from __future__ import annotations

from functools import partial

from arborl.components.artifacts import schemas, storage
from arborl.components.config import Config
from arborl.components.evaluation.evaluate import evaluate_policy
from arborl.components.sampling.agent import SearchEnv
from arborl.components.sampling.backends import load_backend
from arborl.components.sampling.rng import evaluation_seed
from arborl.components.stages.base import device, load_retriever, run_stage
from arborl.components.stages.contract import EvaluateInputs, StageResult


def evaluate_model(cfg: Config, model_uri: str, world_uri: str, splits: tuple[str, ...] = ("val", "test")
                   ) -> tuple[list[dict], dict[str, float]]:
    """Evaluate the model directory at `model_uri` on the world's questions of `splits`: (rows, metrics)."""
    loaded = load_backend(cfg, model_uri, device(cfg), cfg.evaluate.batch_size)
    backend, env = loaded.backend, SearchEnv(load_retriever(world_uri, cfg), loaded.tokenizer, cfg.model.chat_template)
    prompts = [p for split in splits for p in schemas.read_prompts(world_uri, split)]
    return evaluate_policy(backend, env, prompts, cfg.agent, cfg.verify, cfg.evaluate.temperature,
                           seed=evaluation_seed(cfg.run.seed), pass_k=tuple(cfg.evaluate.pass_k),
                           bootstrap=cfg.evaluate.bootstrap, max_tool_error_fraction=cfg.sampling.max_bad_fraction)


def evaluate_outputs(cfg: Config, inputs: dict[str, str], out: str) -> tuple[dict[str, str], dict[str, float]]:
    """Evaluate the input model on the val and test questions → eval.parquet (per-question rows) and metrics."""
    given = EvaluateInputs.from_uris(inputs)
    rows, metrics = evaluate_model(cfg, given.model, given.world)
    uri = storage.join(out, schemas.EVAL_FILE)
    schemas.write(rows, schemas.EVAL, uri)
    return {"eval": uri}, metrics


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    return run_stage("evaluate", cfg, inputs, out, ("evaluate", "agent", "verify", "search", "model"),
                     partial(evaluate_outputs, cfg, inputs, out))
