"""Policy update on labelled trees (docs/design.md, Policy update), packed by default, duplicated as the reference form.

* **packed**: each tree is one sequence with every token once and a 4D tree attention mask; per-token
  weights (A⁺, A⁻, m) carry what the trajectories through a token would have contributed.
* **duplicated**: every root→leaf path is its own right-padded sequence (what TRL and Tree-GRPO's code do).

Both forms compute the same objective, so they give the same loss and gradients up to float rounding:

    loss = −(1/D) Σ_tokens [ A⁺·min(r, 1+ε_high) + A⁻·min(max(r, 1−ε_low), c) − β·m·KL + γ·m·H ]

with r = exp(logπθ − logπold), D the aggregation's divisor over the whole mini-batch (`packing.leaf_scales`),
KL to a frozen reference (k1 or k3) and H the policy entropy. Old log-probs are recomputed with the
trainer's model before the update, in the same form; the sampler's are kept only for a mismatch metric.
When the update is one optimizer step (`ppo_epochs` = `mini_batches` = 1) on a model without dropout, the
model before the step *is* the old policy: the step's own forward gives the old log-probs (detached, r = 1),
and the separate no-grad pass is skipped, as TRL does with one iteration per generation.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Protocol

import torch

from arborl.components.config import TrainConfig
from arborl.components.training import distributed
from arborl.components.training.distributed import Dist
from arborl.components.training.loss import clipped_objective, kl_penalty, logprobs_and_entropy
from arborl.components.training.packing import (
    TreeUnit,
    build_units,
    flex_tree_mask,
    greedy_microbatches,
    leaf_scales,
    packed_inputs,
    token_weights,
)

log = logging.getLogger(__name__)

__all__ = ["Row", "StepHooks", "build_units", "make_rows", "fill_logprobs", "policy_update", "compute_loss",
           "packed_attention_supported"]


@dataclass
class Row:
    """The trainable targets of one forward sequence: a whole tree (packed) or one of its paths (duplicated).

    All tensors are (n,) over the row's trainable tokens, in order.
    """

    unit: TreeUnit
    path: int | None  # None: the packed tree; else the index of the root→leaf path
    a_pos: torch.Tensor  # Σ s_j·max(A_j, 0) over the trajectories through the token
    a_neg: torch.Tensor  # Σ s_j·min(A_j, 0)
    mult: torch.Tensor  # Σ s_j: weight of the KL and entropy terms
    count: torch.Tensor  # trajectories through the token (for per-token metrics)
    count_pos: torch.Tensor  # ... of them with a positive advantage
    count_neg: torch.Tensor  # ... with a negative advantage
    sampler_logprobs: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return bool((self.a_pos != 0).any() or (self.a_neg != 0).any())


def make_rows(units: list[TreeUnit], form: str, scales: list[torch.Tensor]) -> list[Row]:
    """Rows of `form` ("packed" or "duplicated") with weights for the per-leaf `scales` (see leaf_scales)."""
    rows = []
    for unit, scale in zip(units, scales, strict=True):
        if form == "packed":
            idx = unit.trainable.nonzero().squeeze(1)
            a_pos, a_neg, mult = (w[idx] for w in token_weights(unit, scale))
            n_pos, n_neg, count = (w[idx] for w in token_weights(unit, torch.ones_like(scale),
                                                                  torch.sign(unit.leaf_advantages)))
            rows.append(Row(unit, None, a_pos, a_neg, mult, count, n_pos, -n_neg, unit.sampler_logprobs[idx]))
        elif form == "duplicated":
            if unit.node_weights is not None:
                raise ValueError(f"tree {unit.key}: per-node advantages (a per-node estimator such as 'process') "
                                 "apply once per token and have no duplicated form: use train.form=packed")
            for j, path in enumerate(unit.paths):
                idx = path[unit.trainable[path]]
                a, s = float(unit.leaf_advantages[j]), float(scale[j])
                values = (s * max(a, 0.0), s * min(a, 0.0), s, 1.0, float(a > 0), float(a < 0))
                full = [torch.full((len(idx),), v, dtype=torch.float64) for v in values]
                rows.append(Row(unit, j, *full, unit.sampler_logprobs[idx]))
        else:
            raise ValueError(f"unknown training form {form!r}; choose packed or duplicated")
    return rows


def _forward(
    model: torch.nn.Module, rows: list[Row], pad_id: int, bf16: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(log-prob, entropy) of every row's trainable tokens; all rows must share one form. `bf16`: the
    model runs under bfloat16 autocast (log-probs are still taken in float32)."""
    with distributed.autocast(bf16, next(model.parameters()).device.type):
        return _forward_rows(model, rows, pad_id)


def _forward_rows(model: torch.nn.Module, rows: list[Row], pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if rows[0].path is None:
        flex = getattr(distributed.unwrap(model).config, "_attn_implementation", None) == "flex_attention"
        ids, pos, mask = packed_inputs([r.unit for r in rows], pad_id, dtype, dense_mask=not flex)
        if flex:  # a block mask: no T×T tensor, masked-out blocks skipped
            mask = flex_tree_mask([r.unit for r in rows], ids.shape[1], device)
        logits = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device)).logits
        out = []
        for i, r in enumerate(rows):
            idx = r.unit.trainable.nonzero().squeeze(1)
            out.append(logprobs_and_entropy(logits[i, r.unit.pred[idx].to(device)], r.unit.input_ids[idx].to(device)))
        return out
    seqs = [r.unit.input_ids[r.unit.paths[r.path]] for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], attn[i, : len(s)] = s, 1
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
    out = []
    for i, r in enumerate(rows):
        t = r.unit.trainable[r.unit.paths[r.path]].nonzero().squeeze(1)  # target positions (≥ 1: prompt first)
        out.append(logprobs_and_entropy(logits[i, (t - 1).to(device)], ids[i, t].to(device)))
    return out


def _microbatches(rows: list[Row], cfg: TrainConfig) -> list[list[Row]]:
    if rows and rows[0].path is None:
        by_unit = {id(r.unit): r for r in rows}
        return [[by_unit[id(u)] for u in mb] for mb in greedy_microbatches([r.unit for r in rows],
                                                                           cfg.max_tokens_per_microbatch)]
    return [rows[s : s + cfg.micro_batch_size] for s in range(0, len(rows), cfg.micro_batch_size)]


@torch.no_grad()
def fill_logprobs(model: torch.nn.Module, rows: list[Row], cfg: TrainConfig, pad_id: int, attr: str) -> None:
    """Set `attr` ("old_logprobs", "ref_logprobs") of every row to `model`'s log-probabilities of the row's
    trainable tokens: one no-grad eval-mode pass in the training micro-batches."""
    was_training = model.training
    model.eval()
    for mb in _microbatches(rows, cfg):
        for r, (lp, _) in zip(mb, _forward(model, mb, pad_id, cfg.bf16), strict=True):
            setattr(r, attr, lp.detach())
    model.train(was_training)


def dropout_free(model: torch.nn.Module) -> bool:
    """Whether `model` computes the same in train and eval mode: no dropout module with p > 0 and no dropout
    probability > 0 in its Hugging Face config (attention dropout is a functional call, not a module)."""
    base = distributed.unwrap(model)
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in base.modules()):
        return False
    config = getattr(base, "config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    return not any(("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and v > 0 for k, v in settings.items())


def on_policy_step(model: torch.nn.Module, cfg: TrainConfig) -> bool:
    """Whether the update is a single optimizer step whose own forward pass gives the old log-probs."""
    return cfg.ppo_epochs == 1 and cfg.mini_batches == 1 and dropout_free(model)


def _needs_forward(row: Row, cfg: TrainConfig) -> bool:
    return row.active or cfg.kl_coef > 0 or cfg.entropy_coef > 0


def compute_loss(
    model: torch.nn.Module, rows: list[Row], divisor: float, cfg: TrainConfig, pad_id: int, dist: Dist = Dist()
) -> dict[str, float]:
    """Backpropagate −Σ obj / `divisor` over `rows` (micro-batch by micro-batch; gradients accumulate in
    the model) and return the summed loss and count-weighted token statistics.

    Under torchrun `rows` are this rank's share and `divisor` the whole mini-batch's: every rank runs the
    same number of backward passes, gradients sync on the last one only, and each loss is multiplied by
    the world size so that DDP's/FSDP's averaging yields the sum over ranks. Statistics stay per rank."""
    device = next(model.parameters()).device
    stats = dict.fromkeys(("loss", "loss_scale", "clipped", "ratio", "kl", "entropy", "tokens"), 0.0)
    todo = [r for r in rows if _needs_forward(r, cfg)]
    batches = _microbatches(todo, cfg)
    runs = distributed.padded_count(len(batches), dist)
    for i in range(runs):
        with distributed.sync_context(model, last=i == runs - 1):
            if i < len(batches):
                _microbatch_loss(model, batches[i], divisor, cfg, pad_id, dist, stats, device)
            else:  # this rank's share is done; the others' backward passes still all-reduce
                distributed.zero_backward(model, pad_id, device)
    return stats


def _microbatch_loss(model, mb: list[Row], divisor: float, cfg: TrainConfig, pad_id: int, dist: Dist,
                     stats: dict[str, float], device: torch.device) -> None:
    terms = []
    for r, (lp, ent) in zip(mb, _forward(model, mb, pad_id, cfg.bf16), strict=True):
        if r.old_logprobs is None:  # the step's model is the old policy (`on_policy_step`)
            r.old_logprobs = lp.detach()
        old = r.old_logprobs.to(device)
        a_pos, a_neg, mult = (x.to(device=device, dtype=lp.dtype) for x in (r.a_pos, r.a_neg, r.mult))
        obj, _ = clipped_objective(lp, old, a_pos, a_neg, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
        count, n_pos, n_neg = (x.to(device=device, dtype=lp.dtype) for x in (r.count, r.count_pos, r.count_neg))
        if cfg.kl_coef > 0:
            kl = kl_penalty(lp, r.ref_logprobs.to(device), cfg.kl_estimator)
            obj = obj - cfg.kl_coef * mult * kl
            stats["kl"] += float((count * kl.detach()).sum())
        if cfg.entropy_coef > 0:
            obj = obj + cfg.entropy_coef * mult * ent
        terms.append(obj.sum())
        with torch.no_grad():
            stats["loss_scale"] += float(obj.abs().sum()) / divisor  # Σ|term|/D: the loss before cancellation
            ratio = torch.exp(lp - old)
            clipped = n_pos * (ratio > 1 + cfg.clip_high) + n_neg * (
                (ratio < 1 - cfg.clip_low) | (ratio > cfg.dual_clip))
            stats["clipped"] += float(clipped.sum())
            stats["ratio"] += float((count * ratio).sum())
            stats["entropy"] += float((count * ent).sum())
            stats["tokens"] += float(count.sum())
    loss = -torch.stack(terms).sum() / divisor
    (loss * distributed.loss_scale(dist)).backward()
    stats["loss"] += float(loss.detach())


class StepHooks(Protocol):
    """Checkpoint/resume hooks of `policy_update`. `resume()` runs once the old (and reference) log-probs
    are computed and returns the optimizer steps already taken (0: none) with the metric history saved
    then; `after_step(step, history)` runs after every optimizer step."""

    def resume(self) -> tuple[int, dict[str, list[float]]]: ...

    def after_step(self, step: int, history: dict[str, list[float]]) -> None: ...


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    units: list[TreeUnit],
    cfg: TrainConfig,
    pad_id: int,
    seed: int,
    ref_model: torch.nn.Module | None = None,
    dist: Dist = Dist(),
    hooks: StepHooks | None = None,
) -> dict[str, float]:
    """`ppo_epochs` × `mini_batches` optimizer steps over the trees in `units`; returns mean metrics.

    Mini-batches are sets of whole trees (seeded shuffle per epoch); the aggregation divisor counts every
    trajectory of the mini-batch, zero-advantage ones included.

    Under torchrun (`dist`, `model` wrapped in DDP/FSDP) every rank gets the same `units` and owns every
    WORLD_SIZE-th tree; the divisor still counts the whole mini-batch and gradients are summed over ranks,
    so the step equals the single-process one. The shuffles depend only on `seed`, so a run resumed by
    `hooks` from step k takes the same steps k+1, … as an uninterrupted one.
    """
    form = cfg.form
    if form == "packed" and not packed_attention_supported(distributed.unwrap(model), pad_id):
        log.warning("%s ignores a custom 4D attention mask: training in the duplicated form",
                    type(model).__name__)
        form = "duplicated"
    if cfg.kl_coef > 0 and ref_model is None:
        raise ValueError("train.kl_coef > 0 needs a reference model")
    scales, _ = leaf_scales(units, cfg.loss_aggregation, cfg.seq_sum_horizon)
    rows = make_rows(units, form, scales)
    rows_of: dict[int, list[Row]] = {}
    for r in rows:
        rows_of.setdefault(id(r.unit), []).append(r)
    owned = {id(u) for u in distributed.shard(units, dist)}
    mine = [r for r in rows if id(r.unit) in owned]
    if not on_policy_step(model, cfg):
        fill_logprobs(model, [r for r in mine if _needs_forward(r, cfg)], cfg, pad_id, "old_logprobs")
    if cfg.kl_coef > 0:
        fill_logprobs(ref_model, mine, cfg, pad_id, "ref_logprobs")

    rng = random.Random(seed)
    history: dict[str, list[float]] = {k: [] for k in ("loss", "grad_norm", "clip_frac", "ratio_mean", "kl",
                                                       "entropy")}
    done = 0
    if hooks is not None:
        done, saved = hooks.resume()
        history = saved if done else history
    step = 0
    model.train()
    for _ in range(cfg.ppo_epochs):
        order = units[:]
        rng.shuffle(order)
        size = math.ceil(len(order) / cfg.mini_batches) if order else 1
        for m in range(0, len(order), size):
            mini = order[m : m + size]
            _, divisor = leaf_scales(mini, cfg.loss_aggregation, cfg.seq_sum_horizon)
            mini_rows = [r for u in mini for r in rows_of[id(u)]]
            if divisor == 0 or not any(_needs_forward(r, cfg) for r in mini_rows):
                continue
            step += 1
            if step <= done:  # taken before the checkpoint this run resumed from
                continue
            optimizer.zero_grad(set_to_none=True)
            s = compute_loss(model, [r for r in mini_rows if id(r.unit) in owned], divisor, cfg, pad_id, dist)
            s = distributed.all_reduce_sums(s, dist)
            norm = distributed.clip_grad_norm(model, cfg.grad_clip)
            optimizer.step()
            n = max(s["tokens"], 1.0)
            history["loss"].append(s["loss"])
            history["grad_norm"].append(float(norm))
            history["clip_frac"].append(s["clipped"] / n)
            history["ratio_mean"].append(s["ratio"] / n)
            history["kl"].append(s["kl"] / n)
            history["entropy"].append(s["entropy"] / n)
            if hooks is not None:
                hooks.after_step(step, history)
    model.eval()
    out = {k: (sum(v) / len(v) if v else 0.0) for k, v in history.items()}
    with_old = [r for r in rows if r.old_logprobs is not None]
    gap = distributed.all_reduce_sums({
        "gap": sum(float((r.count * (r.old_logprobs.cpu() - r.sampler_logprobs).abs()).sum()) for r in with_old),
        "n": sum(float(r.count.sum()) for r in with_old)}, dist)
    out["logprob_mismatch"] = gap["gap"] / max(gap["n"], 1.0)
    out["packed"] = float(form == "packed")
    out["trees"] = len(units)
    out["trajectories"] = sum(len(u.paths) for u in units)
    out["trained_trajectories"] = sum(int((u.leaf_advantages != 0).sum()) for u in units)
    out["unique_tokens"] = sum(u.num_tokens for u in units)
    out["duplicated_tokens"] = sum(u.duplicated_tokens for u in units)
    out["trainable_tokens"] = sum(float(u.path_trainable().sum()) for u in units)
    return out


_MASK_SUPPORT: dict[type, bool] = {}


@torch.no_grad()
def packed_attention_supported(model: torch.nn.Module, pad_id: int) -> bool:
    """Whether `model` honours a custom 4D attention mask and explicit position ids: a two-branch probe
    tree must give the same log-probs packed as duplicated. Cached per model class."""
    cls = type(model)
    if cls not in _MASK_SUPPORT:
        vocab = int(getattr(model.config, "vocab_size", 8))
        tok = [(3 + 5 * i) % vocab for i in range(9)]
        nodes = [
            {"prompt_id": "probe", "tree_id": 0, "node_id": 0, "parent_id": None, "token_ids": tok[3:5],
             "loss_mask": [True, True], "logprobs": [0.0, 0.0]},
            {"prompt_id": "probe", "tree_id": 0, "node_id": 1, "parent_id": 0, "token_ids": tok[5:7],
             "loss_mask": [True, True], "logprobs": [0.0, 0.0]},
            {"prompt_id": "probe", "tree_id": 0, "node_id": 2, "parent_id": 0, "token_ids": tok[7:9],
             "loss_mask": [True, True], "logprobs": [0.0, 0.0]},
        ]
        units = build_units({"probe": tok[:3]}, nodes, {("probe", 0, 1): 1.0, ("probe", 0, 2): -1.0})
        scales = [torch.ones(2, dtype=torch.float64)]
        was_training = model.training
        model.eval()
        packed = _forward(model, make_rows(units, "packed", scales), pad_id)[0][0]
        dup_rows = make_rows(units, "duplicated", scales)
        dup = _forward(model, dup_rows, pad_id)
        model.train(was_training)
        # packed trainable order: node 0 (2 tokens), node 1 (2), node 2 (2); path 0 = nodes 0,1; path 1 = 0,2
        expected = torch.cat([dup[0][0], dup[1][0][2:]])
        tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
        _MASK_SUPPORT[cls] = bool(torch.allclose(packed, expected, atol=tol, rtol=0))
    return _MASK_SUPPORT[cls]
