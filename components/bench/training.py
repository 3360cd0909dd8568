"""`arborl bench training`: packed vs duplicated forward+backward on trees sampled by a config.

The trees come from the pipeline's own stages (prepare → short warm start → sample → verify → label) run
into a work directory, so a second bench run reuses them. Both forms then compute the loss and gradients of
one mini-batch holding every tree, with the config's micro-batching, alternating `repeats` times; times are
medians. Peak memory per form: a fresh process loads the same model and trees and runs one forward+backward
in that form; its peak RSS (Linux VmHWM, MiB) and on CUDA its peak allocated bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from typing import Any

import torch

from arborl.components.artifacts import storage
from arborl.components.config import Config
from arborl.components.stages import STAGES
from arborl.components.stages.base import device
from arborl.components.stages.train import load_tree_units
from arborl.components.training import trainer
from arborl.components.training.models import load_policy
from arborl.components.training.packing import TreeUnit, leaf_scales


def sample_labelled_trees(cfg: Config, workdir: str, warmstart_steps: int) -> tuple[str, list[TreeUnit]]:
    """Run the stages up to `label` for iteration 1 into `workdir`; return (model dir, tree units)."""
    cfg = cfg.model_copy(deep=True)
    cfg.warmstart.steps = warmstart_steps
    world = STAGES["prepare"](cfg, {}, storage.join(workdir, "prepare")).out
    model = STAGES["warmstart"](cfg, {"world": world}, storage.join(workdir, "warmstart")).out
    nodes = STAGES["sample"](cfg, {"model": model, "world": world}, storage.join(workdir, "sample"), iteration=1).out
    rewards = STAGES["verify"](cfg, {"nodes": nodes, "world": world}, storage.join(workdir, "verify")).out
    labels = STAGES["label"](cfg, {"nodes": nodes, "rewards": rewards, "world": world},
                             storage.join(workdir, "label")).out
    _, tokenizer = load_policy(model, "cpu")
    return model, load_tree_units(nodes, labels, world, tokenizer)


def _prepared_rows(model, units: list[TreeUnit], form: str, cfg: Config, pad_id: int):
    scales, divisor = leaf_scales(units, cfg.train.loss_aggregation, cfg.train.seq_sum_horizon)
    rows = trainer.make_rows(units, form, scales)
    trainer.fill_logprobs(model, rows, cfg.train, pad_id, "old_logprobs")
    return rows, divisor


def _step(model, rows, divisor: float, cfg: Config, pad_id: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.compute_loss(model, rows, divisor, cfg.train, pad_id)
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM (Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_memory_child(model_dir: str, units: list[TreeUnit], form: str, cfg_json: dict, queue) -> None:
    cfg = Config.model_validate(cfg_json)
    model, tokenizer = load_policy(model_dir, device(cfg))
    rows, divisor = _prepared_rows(model, units, form, cfg, tokenizer.pad_token_id)
    before = _peak_rss_mb()
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _step(model, rows, divisor, cfg, tokenizer.pad_token_id)
    queue.put({"peak_rss_mb": _peak_rss_mb(), "peak_rss_mb_before_step": before,
               "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None})


def _peak_memory(model_dir: str, units: list[TreeUnit], form: str, cfg: Config) -> dict[str, Any]:
    """Peak memory of one forward+backward in a fresh process (a process's peak never goes down, and this
    one's includes the sampling that made the trees): same model and trees, one form."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(model_dir, units, form, cfg.model_dump(mode="json"), queue))
    proc.start()
    try:
        return queue.get(timeout=600)
    finally:
        proc.join(timeout=60)


def bench_training(cfg: Config, workdir: str, warmstart_steps: int = 300, repeats: int = 3,
                   measure_memory: bool = True) -> dict[str, Any]:
    """Packed vs duplicated loss+gradient on one batch of sampled trees; see the module docstring."""
    model_dir, units = sample_labelled_trees(cfg, workdir, warmstart_steps)
    model, tokenizer = load_policy(model_dir, device(cfg))
    pad = tokenizer.pad_token_id
    if not trainer.packed_attention_supported(model, pad):
        raise RuntimeError(f"{type(model).__name__} ignores custom 4D attention masks: packed form unavailable")
    if not any(float(u.leaf_advantages.abs().sum()) > 0 for u in units):
        raise RuntimeError("every sampled trajectory has advantage 0 (all rewards tied): nothing to train on; "
                           "sample with a better model (more --warmstart-steps)")
    prepared = {form: _prepared_rows(model, units, form, cfg, pad) for form in ("packed", "duplicated")}
    times: dict[str, list[float]] = {"packed": [], "duplicated": []}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    _step(model, *prepared["packed"], cfg, pad)  # warm-up (allocator, kernels)
    for _ in range(repeats):
        for form in ("packed", "duplicated"):
            seconds, g = _step(model, *prepared[form], cfg, pad)
            times[form].append(seconds)
            grads.setdefault(form, g)
    rel = max(float((grads["packed"][k] - g).abs().max() / g.abs().max().clamp(min=1e-30))
              for k, g in grads["duplicated"].items())
    dup_tokens = sum(u.duplicated_tokens for u in units)
    unique_tokens = sum(u.num_tokens for u in units)
    packed_s, dup_s = statistics.median(times["packed"]), statistics.median(times["duplicated"])
    result: dict[str, Any] = {
        "device": str(next(model.parameters()).device),
        "trees": len(units),
        "trajectories": sum(len(u.paths) for u in units),
        "dup_tokens": dup_tokens,
        "unique_tokens": unique_tokens,
        "ideal_speedup": dup_tokens / unique_tokens,
        "packed_seconds": packed_s,
        "duplicated_seconds": dup_s,
        "packed_speedup": dup_s / packed_s,
        "max_rel_grad_diff": rel,
        "repeats": repeats,
        "max_tokens_per_microbatch": cfg.train.max_tokens_per_microbatch,
        "micro_batch_size": cfg.train.micro_batch_size,
    }
    result["packed_vs_ideal"] = result["packed_speedup"] / result["ideal_speedup"]
    if measure_memory:
        for form, key in (("packed", "packed"), ("duplicated", "dup")):
            mem = _peak_memory(model_dir, units, form, cfg)
            result[f"peak_rss_mb_{key}"] = mem["peak_rss_mb"]
            result[f"peak_rss_mb_{key}_before_step"] = mem["peak_rss_mb_before_step"]
            if mem["cuda_peak_mb"] is not None:
                result[f"cuda_peak_mb_{key}"] = mem["cuda_peak_mb"]
    return result
