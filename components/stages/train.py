"""train: one clipped policy-gradient update on the labelled trees → the next model directory."""

from __future__ import annotations

import io

import torch

from components import schemas, storage
from components.config import Config
from components.models import load_policy, prompt_ids, save_policy
from components.stages.base import StageResult, device, load_prompts, run_stage
from components.training.trainer import build_units, policy_update

OPTIMIZER_FILE = "optimizer.pt"


def run(cfg: Config, inputs: dict[str, str], out: str, iteration: int) -> StageResult:
    def body():
        model, tokenizer = load_policy(inputs["model"], device(cfg))
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        state_uri = storage.join(inputs["model"], OPTIMIZER_FILE)
        if storage.exists(state_uri):  # Adam moments carry over from the previous iteration's update
            state = torch.load(io.BytesIO(storage.read_bytes(state_uri)), map_location=device(cfg))
            optimizer.load_state_dict(state)
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.lr
        ref_model = None
        if cfg.train.kl_coef > 0:
            if "reference" not in inputs:
                raise KeyError("train.kl_coef > 0 needs a 'reference' input (the frozen warm-start model)")
            ref_model, _ = load_policy(inputs["reference"], device(cfg))
            ref_model.requires_grad_(False)
        nodes = schemas.read(storage.join(inputs["nodes"], "nodes.parquet"), schemas.NODES).to_pylist()
        adv = schemas.read(storage.join(inputs["advantages"], "advantages.parquet"), schemas.ADVANTAGES).to_pylist()
        leaf_adv = {(a["prompt_id"], a["tree_id"], a["node_id"]): a["leaf_advantage"]
                    for a in adv if a["leaf_advantage"] is not None}
        wanted = {n["prompt_id"] for n in nodes}
        prompts = {p["prompt_id"]: prompt_ids(tokenizer, p["prompt"])
                   for p in load_prompts(inputs["world"]) if p["prompt_id"] in wanted}
        units = build_units(prompts, nodes, leaf_adv)
        metrics = policy_update(model, optimizer, units, cfg.train, tokenizer.pad_token_id,
                                seed=cfg.run.seed * 7919 + iteration, ref_model=ref_model)
        save_policy(model, tokenizer, out)
        data = io.BytesIO()
        torch.save(optimizer.state_dict(), data)
        storage.write_bytes(storage.join(out, OPTIMIZER_FILE), data.getvalue())
        return {"model": out}, metrics

    return run_stage("train", cfg, inputs, out, ("train",), body, iteration=iteration)
