"""train: one clipped policy-gradient update on the labelled trees → the next model directory.

Runs in one process or under `torchrun` (DDP; FSDP on CUDA): every rank reads the same inputs and trains on
its shard of the trees, rank 0 writes the outputs. With `train.save_every_steps` the stage checkpoints
under `<out>/_checkpoints/`, and a rerun after a crash or kill continues from the newest complete one.
"""

from __future__ import annotations

import io
import logging
import tempfile
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from arborl.components import schemas, storage
from arborl.components.advantages.registry import get_estimator
from arborl.components.config import Config
from arborl.components.models import load_policy, prompt_ids
from arborl.components.stages.base import StageResult, device, load_prompts, run_stage
from arborl.components.training import checkpoint, distributed, lora
from arborl.components.training.packing import TreeUnit
from arborl.components.training.trainer import StepHooks, build_units, policy_update

OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_DIR = "_checkpoints"

log = logging.getLogger(__name__)


def _carry_optimizer_state(optimizer: torch.optim.Optimizer, model_uri: str, lr: float, map_location: str) -> None:
    """Adam moments carry over from the previous iteration's update when they fit these parameters."""
    state_uri = storage.join(model_uri, OPTIMIZER_FILE)
    if not storage.exists(state_uri):
        return
    data = storage.read_bytes(state_uri)
    try:  # weights_only: tensors and plain containers only, so a planted pickle cannot run code
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        text = str(exc)
        refused = [line.strip() for line in text.splitlines() if "unsupported" in line.lower()]
        reason = refused[0] if refused else f"{type(exc).__name__}: {text.splitlines()[0] if text else 'empty'}"
        raise storage.ArtifactError(f"{state_uri}: not an optimizer state of tensors and plain values ({reason})"
                                    ) from exc
    if not isinstance(state, dict):
        raise storage.ArtifactError(f"{state_uri}: not an optimizer state (a {type(state).__name__}, not a dict)")
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:  # e.g. LoRA switched on or off between iterations
        log.warning("%s does not fit the trained parameters (%s); starting with fresh moments", state_uri, exc)
        return
    for group in optimizer.param_groups:
        group["lr"] = lr


def _check_fsdp(cfg: Config) -> None:
    if cfg.train.distributed == "fsdp" and (cfg.train.lora.enabled or cfg.train.save_every_steps):
        raise ValueError("train.distributed 'fsdp' supports full fine-tuning without in-stage checkpoints; "
                         "use 'ddp' with train.lora.enabled or train.save_every_steps")


def load_tree_units(inputs: dict[str, str], tokenizer: PreTrainedTokenizerBase) -> list[TreeUnit]:
    """The labelled trees of the `nodes`, `advantages` and `world` inputs as training units, prompts
    tokenized with `tokenizer`."""
    nodes = schemas.read(storage.join(inputs["nodes"], schemas.NODES_FILE), schemas.NODES).to_pylist()
    adv = schemas.read(storage.join(inputs["advantages"], schemas.ADVANTAGES_FILE), schemas.ADVANTAGES).to_pylist()
    leaf_adv = {(a["prompt_id"], a["tree_id"], a["node_id"]): a["leaf_advantage"]
                for a in adv if a["leaf_advantage"] is not None}
    wanted = {n["prompt_id"] for n in nodes}
    prompts = {p["prompt_id"]: prompt_ids(tokenizer, p["prompt"])
               for p in load_prompts(inputs["world"]) if p["prompt_id"] in wanted}
    per_node = None  # labelled by a per-node estimator (registry kind "node"): the weights as labelled
    if any(get_estimator(name).per_node for name in {a["estimator"] for a in adv}):
        per_node = {(a["prompt_id"], a["tree_id"], a["node_id"]): (a["adv_pos"], a["adv_neg"], a["multiplicity"])
                    for a in adv}
    return build_units(prompts, nodes, leaf_adv, node_weights=per_node)


def train_policy(cfg: Config, inputs: dict[str, str], out: str, iteration: int, dist: distributed.Dist
                 ) -> tuple[dict[str, str], dict[str, Any]]:
    """One policy update of the input model on the labelled trees (this rank's shard of them); rank 0 writes
    the updated model, with its optimizer state, to `out`."""
    here = distributed.device_of(dist, device(cfg))
    fsdp = dist.mode == "fsdp"
    model, tokenizer, lora_base = lora.load_for_training(inputs["model"], cfg.train.lora, here,
                                                                cfg.storage.cache_max_gb)
    if cfg.train.gradient_checkpointing:
        distributed.enable_gradient_checkpointing(model)
    saved_attention = model.config._attn_implementation
    if cfg.train.flex_attention:
        model.set_attn_implementation("flex_attention")
    wrapped = distributed.wrap(model, dist)  # FSDP shards the parameters: build the optimizer after it
    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.train.lr)
    if not fsdp:  # FSDP's optimizer state is sharded; it starts fresh each iteration
        _carry_optimizer_state(optimizer, inputs["model"], cfg.train.lr, here)
    ref_model = None
    if cfg.train.kl_coef > 0:
        if "reference" not in inputs:
            raise KeyError("train.kl_coef > 0 needs a 'reference' input (the frozen warm-start model)")
        ref_model, _ = load_policy(inputs["reference"], here, cfg.storage.cache_max_gb)
        ref_model.requires_grad_(False)
    units = load_tree_units(inputs, tokenizer)

    ckpt_root = storage.join(out, CHECKPOINT_DIR)
    fingerprint = cfg.section_hash("train", iteration=iteration, inputs=inputs)
    every = cfg.train.save_every_steps

    def resume() -> tuple[int, dict[str, list[float]]]:
        uri = checkpoint.latest_checkpoint(ckpt_root, fingerprint) if every else None
        if uri is None:
            return 0, {}
        info = checkpoint.load_checkpoint(uri, model=model, optimizer=optimizer, fingerprint=fingerprint,
                                          map_location=here)
        log.warning("train: resuming from %s (optimizer step %d)", uri, info["step"])
        return info["step"], info["extra"]["history"]

    def after_step(step: int, history: dict[str, list[float]]) -> None:
        if every and step % every == 0 and dist.is_main:
            checkpoint.save_checkpoint(ckpt_root, step, model=model, optimizer=optimizer,
                                       extra={"history": history}, fingerprint=fingerprint,
                                       keep=cfg.train.keep_checkpoints)

    metrics = policy_update(wrapped, optimizer, units, cfg.train, tokenizer.pad_token_id,
                            seed=cfg.run.seed * 7919 + iteration, ref_model=ref_model, dist=dist,
                            hooks=StepHooks(resume=resume, after_step=after_step))
    metrics["world_size"] = dist.world_size
    if cfg.train.flex_attention:
        model.set_attn_implementation(saved_attention)
    if fsdp:
        state = distributed.full_state_dict(wrapped)  # a collective: every rank takes part
        if dist.is_main:
            with tempfile.TemporaryDirectory() as tmp:
                wrapped.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                storage.upload_dir(tmp, out)
    elif dist.is_main:
        data = io.BytesIO()
        torch.save(optimizer.state_dict(), data)
        lora.save_trained(model, tokenizer, out, lora_base)
        storage.write_bytes(storage.join(out, OPTIMIZER_FILE), data.getvalue())
    if dist.is_main:
        storage.remove(ckpt_root)  # the finished model supersedes them
    distributed.barrier(dist)
    return {"model": out}, metrics


def run(cfg: Config, inputs: dict[str, str], out: str, iteration: int) -> StageResult:
    dist = distributed.init(cfg.train.distributed, device(cfg))
    if dist.mode == "fsdp":
        _check_fsdp(cfg)
    try:
        work = partial(train_policy, cfg, inputs, out, iteration, dist)
        return run_stage("train", cfg, inputs, out, ("train",), work, iteration=iteration, keep=(CHECKPOINT_DIR,),
                         writer=dist.is_main)
    finally:
        distributed.shutdown(dist)
