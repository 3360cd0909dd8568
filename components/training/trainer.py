"""Policy update on labelled trees, duplicated form: every root→leaf path is its own sequence.

Old log-probs are recomputed with the trainer's model before the update (the sampler's are kept only
for a mismatch metric). The token-mean normaliser counts every trainable token of the mini-batch,
zero-advantage trajectories included; those contribute no gradient, so their forward pass is skipped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from components.config import TrainConfig
from components.training import distributed
from components.training.distributed import Dist
from components.training.loss import clipped_objective, token_logprobs


@dataclass
class Trajectory:
    """One root→leaf path. `input_ids` (T,), and per position t the target `input_ids[t+1]`."""

    input_ids: list[int]
    trainable: list[bool]  # (T,) True where token t is model-written (a loss target)
    advantage: float
    sampler_logprobs: list[float]  # (T,) NaN where not trainable


def build_trajectories(
    prompt_tokens: dict[str, list[int]],
    nodes: list[dict],
    leaf_advantage: dict[tuple[str, int, int], float],
) -> list[Trajectory]:
    """Duplicate every root→leaf path of the `nodes` rows into a Trajectory."""
    by_key = {(n["prompt_id"], n["tree_id"], n["node_id"]): n for n in nodes}
    out = []
    for (pid, tid, leaf), adv in sorted(leaf_advantage.items()):
        path, node_id = [], leaf
        while node_id is not None:
            node = by_key[(pid, tid, node_id)]
            path.append(node)
            node_id = node["parent_id"]
        ids = list(prompt_tokens[pid])
        trainable = [False] * len(ids)
        logps = [math.nan] * len(ids)
        for node in reversed(path):
            ids += list(node["token_ids"])
            trainable += list(node["loss_mask"])
            logps += [float(x) for x in node["logprobs"]]
        out.append(Trajectory(ids, trainable, float(adv), logps))
    return out


def _batch(trajs: list[Trajectory], pad_id: int, device: torch.device):
    width = max(len(t.input_ids) for t in trajs)
    b = len(trajs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width - 1), dtype=torch.bool)
    adv = torch.zeros((b, width - 1))
    sampler = torch.full((b, width - 1), math.nan)
    for i, t in enumerate(trajs):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        attn[i, :n] = 1
        mask[i, : n - 1] = torch.tensor(t.trainable[1:])
        adv[i, : n - 1] = t.advantage
        sampler[i, : n - 1] = torch.tensor(t.sampler_logprobs[1:])
    return ids.to(device), attn.to(device), mask.to(device), adv.to(device), sampler.to(device)


def _logprobs(model, ids, attn) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    return token_logprobs(logits, ids[:, 1:])


@dataclass
class StepHooks:
    """Checkpoint/resume hooks. `resume()` runs once the old log-probs are computed and returns the number of
    optimizer steps already taken (0: none) with the stats lists saved then; `after_step(step, stats)` runs
    after every optimizer step."""

    resume: Callable[[], tuple[int, dict[str, list[float]]]]
    after_step: Callable[[int, dict[str, list[float]]], None]


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trajectories: list[Trajectory],
    cfg: TrainConfig,
    pad_id: int,
    seed: int,
    dist: Dist = Dist(),
    hooks: StepHooks | None = None,
) -> dict[str, float]:
    """`ppo_epochs` × `mini_batches` clipped policy-gradient steps; returns mean training metrics.

    Under torchrun every rank gets the same `trajectories` and works on its shard of each mini-batch; the
    normaliser counts the whole mini-batch and gradients are summed over ranks, so the step equals the
    single-process one. `model` is then the DDP/FSDP-wrapped model.
    """
    device = next(model.parameters()).device
    mb = cfg.micro_batch_size
    active = [t for t in trajectories if t.advantage != 0.0]
    old: dict[int, torch.Tensor] = {}
    mismatch, mismatch_n = 0.0, 0
    model.eval()
    # each trajectory belongs to one rank for the whole update: that rank computes its old log-probs too
    mine = distributed.shard(active, dist)
    owned = {id(t) for t in mine}
    with torch.no_grad(), distributed.autocast(cfg.bf16, device.type):
        for s in range(0, len(mine), mb):
            chunk = mine[s : s + mb]
            ids, attn, mask, _, sampler = _batch(chunk, pad_id, device)
            lp = _logprobs(model, ids, attn)
            for j, t in enumerate(chunk):
                old[id(t)] = lp[j, : len(t.input_ids) - 1].clone()
            mismatch += (lp - sampler).abs()[mask].sum().item()
            mismatch_n += int(mask.sum())
    mismatch, mismatch_n = distributed.all_reduce_sum(mismatch, dist), distributed.all_reduce_sum(mismatch_n, dist)

    rng = random.Random(seed)
    stats = {"loss": [], "grad_norm": [], "clip_frac": [], "ratio_mean": []}
    done = 0
    if hooks is not None:
        done, saved = hooks.resume()
        if done:
            stats = saved
    step = 0
    model.train()
    for _ in range(cfg.ppo_epochs):
        order = trajectories[:]
        rng.shuffle(order)
        size = math.ceil(len(order) / cfg.mini_batches)
        for m in range(0, len(order), size):
            mini = order[m : m + size]
            n_tokens = sum(sum(t.trainable[1:]) for t in mini)
            todo_all = [t for t in mini if t.advantage != 0.0]
            if n_tokens == 0 or not todo_all:
                continue
            step += 1
            if step <= done:  # taken before the checkpoint this run resumed from
                continue
            todo = [t for t in todo_all if id(t) in owned]
            optimizer.zero_grad(set_to_none=True)
            total, clipped, ratio_sum = 0.0, 0.0, 0.0
            chunks = [todo[s : s + mb] for s in range(0, len(todo), mb)]
            runs = distributed.padded_count(len(chunks), dist)
            for i in range(runs):
                with distributed.sync_context(model, last=i == runs - 1):
                    if i >= len(chunks):  # this rank's shard is done; the others still all-reduce
                        distributed.zero_backward(model, pad_id, device)
                        continue
                    ids, attn, mask, adv, _ = _batch(chunks[i], pad_id, device)
                    with distributed.autocast(cfg.bf16, device.type):
                        lp = _logprobs(model, ids, attn)
                    old_lp = torch.zeros_like(lp)
                    for j, t in enumerate(chunks[i]):
                        old_lp[j, : len(t.input_ids) - 1] = old[id(t)]
                    obj, clip = clipped_objective(
                        lp, old_lp, adv.clamp(min=0), adv.clamp(max=0), cfg.clip_low, cfg.clip_high, cfg.dual_clip
                    )
                    loss = -(obj * mask).sum() / n_tokens
                    (loss * distributed.loss_scale(dist)).backward()
                    total += loss.item()
                    clipped += clip[mask].float().sum().item()
                    ratio_sum += torch.exp(lp - old_lp)[mask].sum().item()
            norm = distributed.clip_grad_norm(model, cfg.grad_clip)
            optimizer.step()
            n_active = sum(sum(t.trainable[1:]) for t in todo_all)
            stats["loss"].append(distributed.all_reduce_sum(total, dist))
            stats["grad_norm"].append(float(norm))
            stats["clip_frac"].append(distributed.all_reduce_sum(clipped, dist) / max(n_active, 1))
            stats["ratio_mean"].append(distributed.all_reduce_sum(ratio_sum, dist) / max(n_active, 1))
            if hooks is not None:
                hooks.after_step(step, stats)
    model.eval()
    out = {k: (sum(v) / len(v) if v else 0.0) for k, v in stats.items()}
    out["logprob_mismatch"] = mismatch / max(mismatch_n, 1)
    out["trajectories"] = len(trajectories)
    out["trained_trajectories"] = len(active)
    out["trainable_tokens"] = sum(sum(t.trainable[1:]) for t in trajectories)
    return out
