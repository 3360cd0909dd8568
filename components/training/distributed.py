"""Data-parallel training under `torchrun`: process group, sharding, exact gradient sums, precision options.

`torchrun --nproc_per_node K arborl stage train ...` starts K ranks; each sees RANK, WORLD_SIZE and LOCAL_RANK
in its environment. Every rank holds the whole batch description, takes its deterministic shard of the
trees, and divides its loss by the normaliser of the *whole* mini-batch (all ranks). Gradients must then be
summed across ranks, but DDP and FSDP average them (divide by WORLD_SIZE): `loss_scale` multiplies each
rank's loss by WORLD_SIZE to undo that, so K ranks take the same step as one process on the same batch.
DDP and FSDP also need the same number of backward passes on every rank: `padded_count` gives the count to
run, and ranks with fewer micro-batches run `zero_backward` passes. Gradient sync happens on the last
micro-batch only (`sync_context`). gloo on CPU, NCCL on CUDA; FSDP needs CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes outputs and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Launched by torchrun with ddp or fsdp: a process group exists and the model gets wrapped."""
        return self.mode != "none"


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init(mode: str, device: str) -> Dist:
    """Join the torchrun job this process belongs to; a plain process is a single rank with no process group.

    `mode` is `train.distributed`; `device` the configured device ("cpu" or "cuda"). Under torchrun the
    process group is started for ddp and fsdp even with one rank, so one GPU runs the same wrapped code.
    Raises ValueError when the launch and the config disagree.
    """
    if not launched_by_torchrun():
        return Dist()
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if mode == "none":
        if world > 1:
            raise ValueError(f"train.distributed is 'none' but the process was launched with WORLD_SIZE={world}")
        return Dist()
    on_cuda = device.startswith("cuda")
    if mode == "fsdp" and not on_cuda:
        raise ValueError("train.distributed 'fsdp' needs run.device cuda; use 'ddp' on CPU")
    if on_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return Dist(rank, world, local, mode)


def device_of(d: Dist, device: str) -> str:
    """The device this rank computes on: its own GPU under CUDA."""
    return f"cuda:{d.local_rank}" if device.startswith("cuda") else device


def shutdown(d: Dist) -> None:
    """Leave the job together: a rank tearing gloo down while another is still busy can abort the process."""
    if d.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def shard(items: Sequence[T], d: Dist) -> list[T]:
    """This rank's items: every WORLD_SIZE-th one starting at RANK (the same on every rank for the same list)."""
    return list(items[d.rank :: d.world_size])


def _reduce(value: float, d: Dist, op) -> float:
    if not d.active:
        return value
    device = f"cuda:{d.local_rank}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_sum(value: float, d: Dist) -> float:
    """The sum of `value` over all ranks (float64, so integer counts stay exact)."""
    return _reduce(float(value), d, dist.ReduceOp.SUM)


def all_reduce_sums(values: dict[str, float], d: Dist) -> dict[str, float]:
    """Each value summed over all ranks, in one collective (float64)."""
    if not d.active:
        return dict(values)
    keys = sorted(values)
    device = f"cuda:{d.local_rank}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist(), strict=True))


def padded_count(n: int, d: Dist) -> int:
    """The most micro-batches any rank has: every rank runs this many backward passes."""
    return int(_reduce(float(n), d, dist.ReduceOp.MAX))


def loss_scale(d: Dist) -> float:
    """Multiply each rank's loss by this: DDP/FSDP average gradients over ranks, the objective needs the sum."""
    return float(d.world_size)


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """DDP or FSDP around `model` (already on its device); unchanged in a single process."""
    if not d.active:
        return model
    if d.mode == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=torch.cuda.current_device(), use_orig_params=True)
    ids = [d.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DDP wrapper (FSDP: use `full_state_dict` to save)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (on CPU, rank 0) of a possibly FSDP-wrapped model."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    if not isinstance(model, FullyShardedDataParallel):
        return unwrap(model).state_dict()
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()


def sync_context(model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on every micro-batch but the last of a mini-batch."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def zero_backward(model: torch.nn.Module, pad_id: int, device: str) -> None:
    """A backward pass that adds nothing to any gradient, for ranks with fewer micro-batches than others."""
    logits = model(input_ids=torch.full((1, 2), pad_id, dtype=torch.long, device=device)).logits
    (logits.float().sum() * 0.0).backward()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm clipping, across shards under FSDP."""
    if hasattr(model, "clip_grad_norm_"):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)


def autocast(enabled: bool, device: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for forward passes when `train.bf16` is on; log-probs are taken in float32 anyway."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (Hugging Face models, LoRA-wrapped ones included)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # frozen embeddings under LoRA: keep a grad path into checkpoints

