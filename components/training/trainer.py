"""Policy update on labelled trees, duplicated form: every root→leaf path is its own sequence.

Old log-probs are recomputed with the trainer's model before the update (the sampler's are kept only
for a mismatch metric). The token-mean normaliser counts every trainable token of the mini-batch,
zero-advantage trajectories included; those contribute no gradient, so their forward pass is skipped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from components.config import TrainConfig
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


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trajectories: list[Trajectory],
    cfg: TrainConfig,
    pad_id: int,
    seed: int,
) -> dict[str, float]:
    """`ppo_epochs` × `mini_batches` clipped policy-gradient steps; returns mean training metrics."""
    device = next(model.parameters()).device
    mb = cfg.micro_batch_size
    active = [t for t in trajectories if t.advantage != 0.0]
    old: dict[int, torch.Tensor] = {}
    mismatch, mismatch_n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(active), mb):
            chunk = active[s : s + mb]
            ids, attn, mask, _, sampler = _batch(chunk, pad_id, device)
            lp = _logprobs(model, ids, attn)
            for j, t in enumerate(chunk):
                old[id(t)] = lp[j, : len(t.input_ids) - 1].clone()
            mismatch += (lp - sampler).abs()[mask].sum().item()
            mismatch_n += int(mask.sum())

    rng = random.Random(seed)
    stats = {"loss": [], "grad_norm": [], "clip_frac": [], "ratio_mean": []}
    model.train()
    for _ in range(cfg.ppo_epochs):
        order = trajectories[:]
        rng.shuffle(order)
        size = math.ceil(len(order) / cfg.mini_batches)
        for m in range(0, len(order), size):
            mini = order[m : m + size]
            n_tokens = sum(sum(t.trainable[1:]) for t in mini)
            todo = [t for t in mini if t.advantage != 0.0]
            if n_tokens == 0 or not todo:
                continue
            optimizer.zero_grad(set_to_none=True)
            total, clipped, ratio_sum = 0.0, 0.0, 0.0
            for s in range(0, len(todo), mb):
                chunk = todo[s : s + mb]
                ids, attn, mask, adv, _ = _batch(chunk, pad_id, device)
                lp = _logprobs(model, ids, attn)
                old_lp = torch.zeros_like(lp)
                for j, t in enumerate(chunk):
                    old_lp[j, : len(t.input_ids) - 1] = old[id(t)]
                obj, clip = clipped_objective(
                    lp, old_lp, adv.clamp(min=0), adv.clamp(max=0), cfg.clip_low, cfg.clip_high, cfg.dual_clip
                )
                loss = -(obj * mask).sum() / n_tokens
                loss.backward()
                total += loss.item()
                clipped += clip[mask].float().sum().item()
                ratio_sum += torch.exp(lp - old_lp)[mask].sum().item()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            n_active = sum(sum(t.trainable[1:]) for t in todo)
            stats["loss"].append(total)
            stats["grad_norm"].append(float(norm))
            stats["clip_frac"].append(clipped / max(n_active, 1))
            stats["ratio_mean"].append(ratio_sum / max(n_active, 1))
    model.eval()
    out = {k: (sum(v) / len(v) if v else 0.0) for k, v in stats.items()}
    out["logprob_mismatch"] = mismatch / max(mismatch_n, 1)
    out["trajectories"] = len(trajectories)
    out["trained_trajectories"] = len(active)
    out["trainable_tokens"] = sum(sum(t.trainable[1:]) for t in trajectories)
    return out
