"""evaluate: greedy and one-sample EM/F1 on the fixed val and test questions → eval.parquet."""

from __future__ import annotations

from components import schemas, storage
from components.config import Config
from components.evaluation.evaluate import evaluate_policy
from components.models import load_policy
from components.sampling.agent import SearchEnv
from components.sampling.backend import HFBackend
from components.stages.base import StageResult, device, load_prompts, load_retriever, run_stage


def run(cfg: Config, inputs: dict[str, str], out: str) -> StageResult:
    def body():
        model, tokenizer = load_policy(inputs["model"], device(cfg))
        env = SearchEnv(load_retriever(inputs["world"], cfg), tokenizer)
        backend = HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.evaluate.batch_size)
        prompts = load_prompts(inputs["world"], "val") + load_prompts(inputs["world"], "test")
        rows, metrics = evaluate_policy(backend, env, prompts, cfg.agent, cfg.verify, cfg.evaluate.temperature,
                                        seed=cfg.run.seed + 17)
        uri = storage.join(out, "eval.parquet")
        schemas.write(rows, schemas.EVAL, uri)
        return {"eval": uri}, metrics

    return run_stage("evaluate", cfg, inputs, out, ("evaluate", "agent", "verify"), body)
