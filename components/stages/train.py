"""train: one clipped policy-gradient update on the labelled trees → the next model directory.

`train_policy` reads as three steps, as in a torchtune recipe: `setup` (model, optimizer state, reference,
training units), `train` (`policy_update`, with `StepCheckpoints` as its checkpoint hooks) and `save`.

Runs in one process or under `torchrun` (DDP; FSDP on CUDA): every rank reads the same inputs and trains on
its shard of the trees, rank 0 writes the outputs. With `train.save_every_steps` the stage checkpoints
under `<out>/_checkpoints/`, and a rerun after a crash or kill continues from the newest complete one.

The output is a model directory in `train.save_dtype` plus its training state (`optimizer.pt`,
`training_state.write_training_state`): the Adam state and, when the saved weights are rounded, the full-precision
master weights. The next iteration starts from the master weights when there are any, so a bfloat16 save loses
no precision across iterations.

In one process (`orchestration.executor: inprocess`, no LoRA, no torchrun) the trained model and its training
state also stay in memory for the next stages (`training/warm.py`), and `train.checkpoint_every: k` writes the
training state only every k-th iteration and at the last. After a restart, train(i+1) rebuilds a state that was
never written by replaying the updates since the last full checkpoint from their recorded inputs, and checks
that each replay reproduces the saved weights bit for bit; the weights then equal an uninterrupted run's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from arborl.components.advantages.registry import get_estimator
from arborl.components.artifacts import manifests, model_files, schemas, storage
from arborl.components.config import Config
from arborl.components.sampling.forest import Forest, node_key, read_prompt_tokens
from arborl.components.sampling.rng import train_shuffle_seed
from arborl.components.stages.base import device, run_stage
from arborl.components.stages.contract import StageResult, TrainInputs
from arborl.components.training import checkpoint, distributed, lora, training_state, warm
from arborl.components.training.models import WEIGHTS_FILE, load_policy, model_dir, row_prompt_ids, save_policy
from arborl.components.training.packing import TreeUnit
from arborl.components.training.trainer import build_units, policy_update

OPTIMIZER_FILE = training_state.TRAINING_STATE_FILE  # the training state: optimizer state and master weights
CHECKPOINT_DIR = model_files.CHECKPOINT_DIR

log = logging.getLogger(__name__)


def _carry_optimizer_state(optimizer: torch.optim.Optimizer, model_uri: str, state: training_state.TrainingState | None,
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
    manifest = manifests.read_manifest(model_uri)
    pruned = manifest.get("pruned") if isinstance(manifest, dict) else None
    return isinstance(pruned, dict) and bool(pruned.get("training_state"))


def _start_from_master(model: torch.nn.Module, model_uri: str, lora_base: str | None,
                       state: training_state.TrainingState | None, map_location: str) -> None:
    """Put the full-precision master weights saved with the input model into `model` (under LoRA: into its
    frozen base, from the base's training state), so training continues from them, not from the saved copy."""
    if lora_base is None:
        if state is not None and state.master is not None:
            training_state.restore_master(model, state.master, storage.join(model_uri, OPTIMIZER_FILE))
        elif state is None and _pruned_state(model_uri):
            log.warning("%s: its training state was pruned (run.keep_iterations): training starts from its saved "
                        "weights with fresh Adam moments", model_uri)
        return
    base_state = state if lora_base == model_uri else training_state.read_training_state(lora_base, map_location)
    if base_state is not None and base_state.master is not None:
        training_state.restore_master(model.get_base_model(), base_state.master,
                                      storage.join(lora_base, OPTIMIZER_FILE))


def _keeps_warm(cfg: Config, dist: distributed.Dist) -> bool:
    """Whether the trained model and its training state stay in memory for the next stages of this process (an
    in-process run, `warm.kept`)."""
    return warm.ENABLED["on"] and not dist.active and not cfg.train.lora.enabled


def _writes_state(cfg: Config, dist: distributed.Dist, iteration: int) -> bool:
    """Whether this iteration writes its training state: always, unless it is kept warm in memory and is
    neither a multiple of train.checkpoint_every nor the last iteration."""
    every = cfg.train.checkpoint_every
    return not _keeps_warm(cfg, dist) or iteration % every == 0 or iteration >= cfg.run.iterations


def _saved_without_state(model_uri: str) -> bool:
    """Whether the model directory `model_uri` is a train output that left its training state in memory."""
    manifest = manifests.read_manifest(model_uri)
    metrics = manifest.get("metrics") if isinstance(manifest, dict) else None
    return manifest.get("stage") == "train" and isinstance(metrics, dict) and metrics.get("state_saved") == 0


def _input_state(cfg: Config, model_uri: str, dist: distributed.Dist, here: str
                 ) -> training_state.TrainingState | None:
    """The training state to continue from: kept in memory, else on disk, else rebuilt by replaying the update
    that made `model_uri` (its state was never written: train.checkpoint_every)."""
    state = warm.training_state(model_uri)
    if state is None:
        state = training_state.read_training_state(model_uri, here)
    if state is None and _saved_without_state(model_uri):
        _replay(cfg, model_uri, dist)
        state = warm.training_state(model_uri)
    return state


def _replay(cfg: Config, model_uri: str, dist: distributed.Dist) -> None:
    """Redo the update that wrote `model_uri`, from the inputs and iteration its manifest records (recursively
    back to the last state on disk), check that it reproduces the saved weights bit for bit, and keep the
    result warm with its training state."""
    manifest = manifests.read_manifest(model_uri)
    iteration = int(manifest["metrics"]["iteration"])
    log.warning("train: %s was saved without its training state (train.checkpoint_every=%d): replaying iteration "
                "%d's update to rebuild it", model_uri, cfg.train.checkpoint_every, iteration)
    s = setup(cfg, manifest["inputs"], dist)
    train(cfg, s, iteration, dist, StepCheckpoints(cfg, s, manifest["inputs"], None, iteration, dist))
    model = s.model
    master = training_state.master_weights(dict(model.named_parameters(remove_duplicate=False)), cfg.train.save_dtype)
    warm.keep_trained(model_uri, model, s.tokenizer, s.optimizer.state_dict(), master, cfg.train.save_dtype)
    if isinstance(manifest.get("pruned"), dict) and manifest["pruned"].get("weights"):
        return  # nothing to compare with (run.keep_iterations); the replays after it are checked
    saved = load_file(str(model_dir(model_uri, cfg.storage.cache_max_gb) / WEIGHTS_FILE))
    ours = model.state_dict()
    differ = [k for k, v in saved.items() if k not in ours or not torch.equal(ours[k].to(v.dtype), v)]
    if differ:
        warm.forget(model_uri)
        raise RuntimeError(f"train: replaying the update that wrote {model_uri} did not reproduce its weights "
                           f"({len(differ)} tensors differ, e.g. {differ[0]!r}); its training state cannot be rebuilt."
                           " Start a new run.name, or resume from the last full checkpoint's iteration")


def _check_fsdp(cfg: Config) -> None:
    if cfg.train.distributed == "fsdp" and (cfg.train.lora.enabled or cfg.train.save_every_steps):
        raise ValueError("train.distributed 'fsdp' supports full fine-tuning without in-stage checkpoints; "
                         "use 'ddp' with train.lora.enabled or train.save_every_steps")


def load_tree_units(nodes: str, advantages: str, world: str, tokenizer: PreTrainedTokenizerBase,
                    chat_template: str = "auto") -> list[TreeUnit]:
    """The labelled trees of the sample output `nodes` and the label output `advantages` as training units, each
    after the prompt token ids it was sampled from (a sample output written before they were saved: the prompts
    of the prepare output `world` tokenized with `tokenizer` again, as sampling did, `models.row_prompt_ids`)."""
    forest = Forest.read(nodes)
    adv = schemas.read(storage.join(advantages, schemas.ADVANTAGES_FILE), schemas.ADVANTAGES).to_pylist()
    leaf_adv = {node_key(a): a["leaf_advantage"] for a in adv if a["leaf_advantage"] is not None}
    prompts = read_prompt_tokens(nodes)
    if prompts is None:
        wanted = {k.prompt_id for k in forest.nodes}
        prompts = {p["prompt_id"]: row_prompt_ids(tokenizer, p, chat_template)
                   for p in schemas.read_prompts(world) if p["prompt_id"] in wanted}
    per_node = None  # labelled by a per-node estimator (registry kind "node"): the weights as labelled
    if any(get_estimator(name).per_node for name in {a["estimator"] for a in adv}):
        per_node = {node_key(a): (a["adv_pos"], a["adv_neg"], a["multiplicity"]) for a in adv}
    return build_units(prompts, list(forest.nodes.values()), leaf_adv, node_weights=per_node)


@dataclass
class TrainSetup:
    """What one policy update works on: the model at full precision (`wrapped` for DDP/FSDP), its tokenizer,
    the optimizer with the carried Adam moments, the frozen reference (train.kl_coef > 0), the LoRA base (None:
    full fine-tuning) and the labelled trees as training units."""

    model: torch.nn.Module
    wrapped: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    ref_model: torch.nn.Module | None
    lora_base: str | None
    units: list[TreeUnit]
    device: str
    attention: str  # the model's attention implementation, restored after training with flex_attention


def setup(cfg: Config, inputs: dict[str, str], dist: distributed.Dist) -> TrainSetup:
    """Load the input model (from its master weights when it has them), its optimizer state, the reference and
    the training units."""
    given = TrainInputs.from_uris(inputs)
    here = distributed.device_of(dist, device(cfg))
    state = _input_state(cfg, given.model, dist, here)  # first: a replay rebuilds the input model too
    model, tokenizer, lora_base = lora.load_for_training(given.model, cfg.train.lora, here,
                                                         cfg.storage.cache_max_gb)
    _start_from_master(model, given.model, lora_base, state, here)
    if cfg.train.gradient_checkpointing:
        distributed.enable_gradient_checkpointing(model)
    attention = model.config._attn_implementation
    if cfg.train.flex_attention:
        model.set_attn_implementation("flex_attention")
    wrapped = distributed.wrap(model, dist)  # FSDP shards the parameters: build the optimizer after it
    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.train.lr)
    if dist.mode != "fsdp":  # FSDP's optimizer state is sharded; it starts fresh each iteration
        _carry_optimizer_state(optimizer, given.model, state, cfg.train.lr)
    del state  # the moments are in the optimizer now
    units = load_tree_units(given.nodes, given.advantages, given.world, tokenizer, cfg.model.chat_template)
    return TrainSetup(model, wrapped, tokenizer, optimizer, _reference(cfg, given, here), lora_base, units, here,
                      attention)


def _reference(cfg: Config, given: TrainInputs, here: str) -> torch.nn.Module | None:
    """The frozen warm-start model of the KL penalty (train.kl_coef > 0), at its full precision; else None."""
    if cfg.train.kl_coef <= 0:
        return None
    if given.reference is None:
        raise KeyError("train.kl_coef > 0 needs a 'reference' input (the frozen warm-start model)")
    ref_model, _ = load_policy(given.reference, here, cfg.storage.cache_max_gb)
    ref_state = training_state.read_training_state(given.reference, here)
    if ref_state is not None and ref_state.master is not None:
        training_state.restore_master(ref_model, ref_state.master, storage.join(given.reference, OPTIMIZER_FILE))
    ref_model.requires_grad_(False)
    return ref_model


class StepCheckpoints:
    """In-stage checkpoints (train.save_every_steps) under `<out>/_checkpoints/`, as `policy_update`'s hooks:
    `resume` continues from the newest one made with the same settings and inputs, `after_step` saves every
    `save_every_steps` optimizer steps (rank 0). Without `out` (a replay) there are none."""

    def __init__(self, cfg: Config, s: TrainSetup, inputs: dict[str, str], out: str | None, iteration: int,
                 dist: distributed.Dist):
        self.cfg, self.s, self.dist = cfg, s, dist
        self.root = storage.join(out, CHECKPOINT_DIR) if out is not None else ""
        self.fingerprint = cfg.section_hash("train", iteration=iteration, inputs=inputs)
        self.every = cfg.train.save_every_steps if out is not None else 0

    def resume(self) -> tuple[int, dict[str, list[float]]]:
        uri = checkpoint.latest_checkpoint(self.root, self.fingerprint) if self.every else None
        if uri is None:
            return 0, {}
        info = checkpoint.load_checkpoint(uri, model=self.s.model, optimizer=self.s.optimizer,
                                          fingerprint=self.fingerprint, map_location=self.s.device)
        log.warning("train: resuming from %s (optimizer step %d)", uri, info["step"])
        return info["step"], info["extra"]["history"]

    def after_step(self, step: int, history: dict[str, list[float]]) -> None:
        if self.every and step % self.every == 0 and self.dist.is_main:
            checkpoint.save_checkpoint(self.root, step, model=self.s.model, optimizer=self.s.optimizer,
                                       extra={"history": history}, fingerprint=self.fingerprint,
                                       keep=self.cfg.train.keep_checkpoints)


def train(cfg: Config, s: TrainSetup, iteration: int, dist: distributed.Dist, hooks: StepCheckpoints
          ) -> dict[str, Any]:
    """The policy update of iteration `iteration` on `s` (the optimizer steps of `policy_update`); its metrics."""
    metrics = policy_update(s.wrapped, s.optimizer, s.units, cfg.train, s.tokenizer.pad_token_id,
                            seed=train_shuffle_seed(cfg.run.seed, iteration), ref_model=s.ref_model, dist=dist,
                            hooks=hooks)
    metrics["world_size"] = dist.world_size
    if cfg.train.flex_attention:
        s.model.set_attn_implementation(s.attention)
    return metrics


def save(cfg: Config, s: TrainSetup, out: str, iteration: int, dist: distributed.Dist) -> bool:
    """Rank 0 writes the updated model to `out` in train.save_dtype, with its training state unless that stays
    in memory (train.checkpoint_every), keeps it warm for the next stages of this process, and removes the
    in-stage checkpoints; returns whether the training state was written."""
    write_state = _writes_state(cfg, dist, iteration)
    if dist.mode == "fsdp":
        state = distributed.full_state_dict(s.wrapped)  # a collective: every rank takes part
        if dist.is_main:  # FSDP's sharded optimizer state is not kept: only master weights, when rounded
            training_state.write_training_state(out, None, training_state.master_weights(state, cfg.train.save_dtype))
            save_policy(s.wrapped.module, s.tokenizer, out, dtype=cfg.train.save_dtype, state_dict=state)
    elif dist.is_main:
        # under LoRA the adapter is saved at full precision and the base is unchanged: no master weights
        master = None if s.lora_base is not None else training_state.master_weights(
            dict(s.model.named_parameters(remove_duplicate=False)), cfg.train.save_dtype)
        if write_state:
            training_state.write_training_state(out, s.optimizer.state_dict(), master)
        lora.save_trained(s.model, s.tokenizer, out, s.lora_base, dtype=cfg.train.save_dtype)
        if _keeps_warm(cfg, dist):  # the next stages of this process take it from memory
            warm.keep_trained(out, s.model, s.tokenizer, s.optimizer.state_dict(), master, cfg.train.save_dtype)
    if dist.is_main:
        storage.remove(storage.join(out, CHECKPOINT_DIR))  # the finished model supersedes them
    distributed.barrier(dist)
    return write_state


def train_policy(cfg: Config, inputs: dict[str, str], out: str, iteration: int, dist: distributed.Dist
                 ) -> tuple[dict[str, str], dict[str, Any]]:
    """One policy update of the input model on the labelled trees (this rank's shard of them): set up, train,
    save to `out`."""
    s = setup(cfg, inputs, dist)
    metrics = train(cfg, s, iteration, dist, StepCheckpoints(cfg, s, inputs, out, iteration, dist))
    metrics["iteration"] = iteration
    metrics["state_saved"] = float(save(cfg, s, out, iteration, dist))
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
