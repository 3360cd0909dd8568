"""train: one clipped policy-gradient update on the labelled trees → the next model directory.

Runs in one process or under `torchrun` (DDP; FSDP on CUDA): every rank reads the same inputs and trains on
its shard of the trees, rank 0 writes the outputs. With `train.save_every_steps` the stage checkpoints
under `<out>/_checkpoints/`, and a rerun after a crash or kill continues from the newest complete one.

The output is a model directory in `train.save_dtype` plus its training state (`optimizer.pt`,
`checkpoint.write_training_state`): the Adam state and, when the saved weights are rounded, the full-precision
master weights. The next iteration starts from the master weights when there are any, so a bfloat16 save loses
no precision across iterations.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from arborl.components import schemas, storage
from arborl.components.advantages.registry import get_estimator
from arborl.components.config import Config
from arborl.components.models import load_policy, row_prompt_ids, save_policy
from arborl.components.stages.base import StageResult, device, load_prompts, run_stage
from arborl.components.training import checkpoint, distributed, lora
from arborl.components.training.packing import TreeUnit
from arborl.components.training.trainer import StepHooks, build_units, policy_update

OPTIMIZER_FILE = checkpoint.TRAINING_STATE_FILE  # the training state: optimizer state and master weights
CHECKPOINT_DIR = "_checkpoints"

log = logging.getLogger(__name__)


def _carry_optimizer_state(optimizer: torch.optim.Optimizer, model_uri: str, state: checkpoint.TrainingState | None,
                           lr: float) -> None:
    """Adam moments carry over from the previous iteration's update (`state`, the training state of the model
    directory `model_uri`) when they fit these parameters."""
    if state is None or state.optimizer is None:
        return
    state_uri = storage.join(model_uri, OPTIMIZER_FILE)
    try:
        optimizer.load_state_dict(state.optimizer)
    except ValueError as exc:  # e.g. LoRA switched on or off between iterations
        log.warning("%s does not fit the trained parameters (%s); starting with fresh moments", state_uri, exc)
        return
    for group in optimizer.param_groups:
        group["lr"] = lr


def _pruned_state(model_uri: str) -> bool:
    """Whether the training state of the model directory `model_uri` was deleted (`run.keep_iterations`)."""
    manifest = storage.read_manifest(model_uri)
    pruned = manifest.get("pruned") if isinstance(manifest, dict) else None
    return isinstance(pruned, dict) and bool(pruned.get("training_state"))


def _start_from_master(model: torch.nn.Module, model_uri: str, lora_base: str | None,
                       state: checkpoint.TrainingState | None, map_location: str) -> None:
    """Put the full-precision master weights saved with the input model into `model` (under LoRA: into its
    frozen base, from the base's training state), so training continues from them, not from the saved copy."""
    if lora_base is None:
        if state is not None and state.master is not None:
            checkpoint.restore_master(model, state.master, storage.join(model_uri, OPTIMIZER_FILE))
        elif state is None and _pruned_state(model_uri):
            log.warning("%s: its training state was pruned (run.keep_iterations): training starts from its saved "
                        "weights with fresh Adam moments", model_uri)
        return
    base_state = state if lora_base == model_uri else checkpoint.read_training_state(lora_base, map_location)
    if base_state is not None and base_state.master is not None:
        checkpoint.restore_master(model.get_base_model(), base_state.master, storage.join(lora_base, OPTIMIZER_FILE))


def _check_fsdp(cfg: Config) -> None:
    if cfg.train.distributed == "fsdp" and (cfg.train.lora.enabled or cfg.train.save_every_steps):
        raise ValueError("train.distributed 'fsdp' supports full fine-tuning without in-stage checkpoints; "
                         "use 'ddp' with train.lora.enabled or train.save_every_steps")


def load_tree_units(inputs: dict[str, str], tokenizer: PreTrainedTokenizerBase, chat_template: str = "auto"
                    ) -> list[TreeUnit]:
    """The labelled trees of the `nodes`, `advantages` and `world` inputs as training units, prompts
    tokenized with `tokenizer` as sampling did (`models.row_prompt_ids`)."""
    nodes = schemas.read(storage.join(inputs["nodes"], schemas.NODES_FILE), schemas.NODES).to_pylist()
    adv = schemas.read(storage.join(inputs["advantages"], schemas.ADVANTAGES_FILE), schemas.ADVANTAGES).to_pylist()
    leaf_adv = {(a["prompt_id"], a["tree_id"], a["node_id"]): a["leaf_advantage"]
                for a in adv if a["leaf_advantage"] is not None}
    wanted = {n["prompt_id"] for n in nodes}
    prompts = {p["prompt_id"]: row_prompt_ids(tokenizer, p, chat_template)
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
    state = checkpoint.read_training_state(inputs["model"], here)
    _start_from_master(model, inputs["model"], lora_base, state, here)
    if cfg.train.gradient_checkpointing:
        distributed.enable_gradient_checkpointing(model)
    saved_attention = model.config._attn_implementation
    if cfg.train.flex_attention:
        model.set_attn_implementation("flex_attention")
    wrapped = distributed.wrap(model, dist)  # FSDP shards the parameters: build the optimizer after it
    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.train.lr)
    if not fsdp:  # FSDP's optimizer state is sharded; it starts fresh each iteration
        _carry_optimizer_state(optimizer, inputs["model"], state, cfg.train.lr)
    del state  # the moments are in the optimizer now
    ref_model = None
    if cfg.train.kl_coef > 0:
        if "reference" not in inputs:
            raise KeyError("train.kl_coef > 0 needs a 'reference' input (the frozen warm-start model)")
        ref_model, _ = load_policy(inputs["reference"], here, cfg.storage.cache_max_gb)
        ref_state = checkpoint.read_training_state(inputs["reference"], here)
        if ref_state is not None and ref_state.master is not None:
            checkpoint.restore_master(ref_model, ref_state.master, storage.join(inputs["reference"], OPTIMIZER_FILE))
        ref_model.requires_grad_(False)
    units = load_tree_units(inputs, tokenizer, cfg.model.chat_template)

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
        if dist.is_main:  # FSDP's sharded optimizer state is not kept: only master weights, when rounded
            checkpoint.write_training_state(out, None, checkpoint.master_weights(state, cfg.train.save_dtype))
            save_policy(wrapped.module, tokenizer, out, dtype=cfg.train.save_dtype, state_dict=state)
    elif dist.is_main:
        # under LoRA the adapter is saved at full precision and the base is unchanged: no master weights
        master = None if lora_base is not None else checkpoint.master_weights(
            dict(model.named_parameters(remove_duplicate=False)), cfg.train.save_dtype)
        checkpoint.write_training_state(out, optimizer.state_dict(), master)
        lora.save_trained(model, tokenizer, out, lora_base, dtype=cfg.train.save_dtype)
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
