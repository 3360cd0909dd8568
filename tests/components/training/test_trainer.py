"""components.training.trainer: packed and duplicated forms of the policy update.

The exactness tests compare the packed form (each tree once, tree attention mask) with the duplicated form
(each root→leaf path its own sequence) on random trees, and both with an independent float64 reference
written here from the formulas of docs/design.md (Policy update).
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from arborl.components.advantages.registry import leaf_advantages
from arborl.components.config import AgentConfig, SamplingConfig, TrainConfig
from arborl.components.sampling.agent import SearchEnv
from arborl.components.sampling.engine import HFBackend
from arborl.components.sampling.scheduler import sample_trees
from arborl.components.sampling.tree import node_rows
from arborl.components.training import trainer
from arborl.components.training.models import prompt_ids
from arborl.components.training.packing import leaf_scales
from arborl.components.training.trainer import (
    build_units,
    compute_loss,
    make_rows,
    packed_attention_supported,
    policy_update,
)

NAN = math.nan
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def random_trees(vocab: int, bos: int, n_trees: int, seed: int) -> tuple[dict, list[dict], dict]:
    """Random trees with varied depth and branching, observation tokens, mixed-sign and zero advantages.
    Returns (prompt tokens by prompt_id, node rows, leaf advantages)."""
    rng = random.Random(seed)
    prompts, rows, adv = {}, [], {}
    for t in range(n_trees):
        pid = f"q{t // 2}"  # two trees per prompt
        prompts.setdefault(pid, [bos] + [rng.randrange(4, vocab) for _ in range(rng.randint(2, 6))])
        tid = t % 2
        n_nodes = rng.randint(1, 9)
        parents = [None] + [rng.choice([None, *range(i)]) if rng.random() < 0.3 else rng.randrange(i)
                            for i in range(1, n_nodes)]
        for nid, parent in enumerate(parents):
            n_act, n_obs = rng.randint(1, 5), rng.choice([0, 0, rng.randint(1, 4)])
            ids = [rng.randrange(4, vocab) for _ in range(n_act + n_obs)]
            mask = [True] * n_act + [False] * n_obs
            rows.append({"prompt_id": pid, "tree_id": tid, "node_id": nid, "parent_id": parent, "token_ids": ids,
                         "loss_mask": mask, "logprobs": [-1.0 if m else NAN for m in mask]})
        leaves = set(range(n_nodes)) - {p for p in parents if p is not None}
        for leaf in sorted(leaves):
            adv[(pid, tid, leaf)] = rng.choice([0.0, rng.uniform(-2, 2), rng.uniform(-2, 2)])
    return prompts, rows, adv


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"grad_clip": 1e9, "micro_batch_size": 3, "max_tokens_per_microbatch": 64, **kw})


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for k, p in model.named_parameters()}


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in b)


def _perturb(model, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _loss_and_grads(model, ref_model, units, form, cfg, pad_id, perturb_seed):
    """Old (and reference) log-probs from `model`, then perturb its weights, then one loss + backward."""
    model = copy.deepcopy(model)
    scales, divisor = leaf_scales(units, cfg.loss_aggregation, cfg.seq_sum_horizon)
    rows = make_rows(units, form, scales)
    trainer.fill_logprobs(model, rows, cfg, pad_id, "old_logprobs")
    trainer.fill_logprobs(ref_model, rows, cfg, pad_id, "ref_logprobs")
    _perturb(model, 0.15, perturb_seed)
    model.zero_grad(set_to_none=True)
    stats = compute_loss(model, rows, divisor, cfg, pad_id)
    return stats, _grads(model), rows


def _reference_loss(model, ref_model, units, cfg, perturb_seed) -> tuple[float, dict, dict]:
    """Float64 reference: every trajectory its own unpadded sequence, the formulas written out."""
    old_model = copy.deepcopy(model).double()
    ref = copy.deepcopy(ref_model).double()
    model = copy.deepcopy(model)
    _perturb(model, 0.15, perturb_seed)
    model = model.double()
    trajs = []
    for u in units:
        for path, a in zip(u.paths, u.leaf_advantages.tolist(), strict=True):
            trajs.append((u.input_ids[path], u.trainable[path], a))
    n_tok = sum(int(m.sum()) for _, m, _ in trajs)
    divisor = {"token-mean": n_tok, "seq-mean-token-mean": len(trajs),
               "seq-mean-token-sum-norm": len(trajs) * cfg.seq_sum_horizon}[cfg.loss_aggregation]
    regions = {"pos_clip": 0, "neg_clip_low": 0, "neg_dual": 0}
    total = 0.0
    for ids, mask, a in trajs:
        t = mask.nonzero().squeeze(1)
        def logp(m, ids=ids, t=t):
            lsm = torch.log_softmax(m(input_ids=ids[None]).logits[0], -1)
            return lsm[t - 1].gather(-1, ids[t][:, None]).squeeze(-1), lsm[t - 1]
        with torch.no_grad():
            old, _ = logp(old_model)
            ref_lp, _ = logp(ref)
        lp, lsm = logp(model)
        r = torch.exp(lp - old)
        if a > 0:
            obj = a * torch.minimum(r, torch.full_like(r, 1 + cfg.clip_high))
            regions["pos_clip"] += int((r > 1 + cfg.clip_high).sum())
        else:
            obj = a * torch.minimum(torch.maximum(r, torch.full_like(r, 1 - cfg.clip_low)),
                                    torch.full_like(r, cfg.dual_clip))
            if a < 0:
                regions["neg_clip_low"] += int((r < 1 - cfg.clip_low).sum())
                regions["neg_dual"] += int((r > cfg.dual_clip).sum())
        d = ref_lp - lp
        kl = (lp - ref_lp) if cfg.kl_estimator == "k1" else torch.exp(d) - d - 1
        ent = -(lsm.exp() * lsm).sum(-1)
        obj = obj - cfg.kl_coef * kl + cfg.entropy_coef * ent
        scale = 1.0 / len(t) if cfg.loss_aggregation == "seq-mean-token-mean" else 1.0
        loss = -(scale * obj).sum() / divisor
        loss.backward()
        total += float(loss.detach())
    return total, {k: v.float() for k, v in _grads(model).items()}, regions


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_packed_equals_duplicated_loss_and_gradients(tiny_model, tokenizer, aggregation, kl_estimator):
    prompts, rows, adv = random_trees(len(tokenizer), tokenizer.bos_token_id, n_trees=8, seed=3)
    units = build_units(prompts, rows, adv)
    ref_model = copy.deepcopy(tiny_model)
    _perturb(ref_model, 0.05, 99)
    cfg = _cfg(loss_aggregation=aggregation, kl_coef=0.1, kl_estimator=kl_estimator, entropy_coef=0.01)
    pad = tokenizer.pad_token_id

    packed, g_packed, _ = _loss_and_grads(tiny_model, ref_model, units, "packed", cfg, pad, perturb_seed=7)
    dup, g_dup, _ = _loss_and_grads(tiny_model, ref_model, units, "duplicated", cfg, pad, perturb_seed=7)
    # relative to the loss's scale before positive and negative terms cancel (Σ|term|/D)
    assert abs(packed["loss"] - dup["loss"]) <= 1e-5 * dup["loss_scale"]
    assert _max_rel_diff(g_packed, g_dup) <= 1e-5
    for key in ("clipped", "ratio", "kl", "entropy", "tokens"):
        assert packed[key] == pytest.approx(dup[key], rel=1e-5), key

    ref_loss, g_ref, regions = _reference_loss(tiny_model, ref_model, units, cfg, perturb_seed=7)
    assert min(regions.values()) > 0, regions  # the perturbation reached every clip region
    assert abs(packed["loss"] - ref_loss) <= 1e-4 * dup["loss_scale"]
    assert _max_rel_diff(g_packed, g_ref) <= 1e-4  # float32 vs float64


def test_packed_update_equals_duplicated_update_over_mini_batches_and_epochs(tiny_model, tokenizer):
    prompts, rows, adv = random_trees(len(tokenizer), tokenizer.bos_token_id, n_trees=10, seed=5)
    units = build_units(prompts, rows, adv)
    models = {}
    for form in ("packed", "duplicated"):
        m = copy.deepcopy(tiny_model)
        metrics = policy_update(m, torch.optim.SGD(m.parameters(), lr=0.5), units,
                                _cfg(form=form, mini_batches=2, ppo_epochs=2), tokenizer.pad_token_id, seed=11)
        models[form] = (m, metrics)
    (pm, pmet), (dm, dmet) = models["packed"], models["duplicated"]
    for (k, a), (_, b) in zip(pm.named_parameters(), dm.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
    assert pmet["packed"] == 1.0 and dmet["packed"] == 0.0
    assert pmet["unique_tokens"] < pmet["duplicated_tokens"] == dmet["duplicated_tokens"]
    assert pmet["loss"] == pytest.approx(dmet["loss"], rel=1e-4)
    assert abs(pmet["ratio_mean"] - 1.0) > 1e-3  # later steps saw ratios away from 1


def test_one_step_update_takes_old_logprobs_from_its_own_forward(tiny_model, tokenizer, monkeypatch):
    """One optimizer step on a dropout-free model: the step's forward gives the old log-probs (no separate
    no-grad pass), and the update equals the one with a separate pass up to float rounding."""
    prompts, rows, adv = random_trees(len(tokenizer), tokenizer.bos_token_id, n_trees=6, seed=8)
    units = build_units(prompts, rows, adv)
    assert trainer.on_policy_step(tiny_model, _cfg()) and trainer.dropout_free(tiny_model)
    passes = []
    real_fill = trainer.fill_logprobs
    monkeypatch.setattr(trainer, "fill_logprobs", lambda *a, **k: passes.append(a[-1]) or real_fill(*a, **k))
    models = {}
    for shortcut in (True, False):
        monkeypatch.setattr(trainer, "on_policy_step", lambda model, cfg, s=shortcut: s)
        m = copy.deepcopy(tiny_model)
        metrics = policy_update(m, torch.optim.SGD(m.parameters(), lr=0.5), units, _cfg(), tokenizer.pad_token_id,
                                seed=3)
        models[shortcut] = (m, metrics)
    assert passes == ["old_logprobs"]  # only the run without the shortcut made the no-grad pass
    (fast, fast_metrics), (slow, slow_metrics) = models[True], models[False]
    assert fast_metrics["ratio_mean"] == 1.0  # exactly: the old log-probs are the step's own, detached
    assert slow_metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert fast_metrics["logprob_mismatch"] == pytest.approx(slow_metrics["logprob_mismatch"], rel=1e-4)
    for (k, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(fast.parameters(), tiny_model.parameters(), strict=True))


def test_dropout_or_several_steps_keep_the_separate_old_logprob_pass(tiny_model):
    assert not trainer.on_policy_step(tiny_model, _cfg(mini_batches=2))
    assert not trainer.on_policy_step(tiny_model, _cfg(ppo_epochs=2))
    dropping = copy.deepcopy(tiny_model)
    dropping.config.attention_dropout = 0.1  # a functional dropout, seen only in the config
    assert not trainer.on_policy_step(dropping, _cfg())
    with_module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    assert not trainer.dropout_free(with_module)


def test_zero_advantages_without_kl_change_nothing(tiny_model, tokenizer):
    prompts, rows, adv = random_trees(len(tokenizer), tokenizer.bos_token_id, n_trees=4, seed=1)
    units = build_units(prompts, rows, dict.fromkeys(adv, 0.0))
    before = {k: v.detach().clone() for k, v in tiny_model.named_parameters()}
    metrics = policy_update(tiny_model, torch.optim.Adam(tiny_model.parameters(), lr=0.1), units, _cfg(),
                            tokenizer.pad_token_id, seed=0)
    for k, v in tiny_model.named_parameters():
        assert torch.equal(v, before[k]), k
    assert metrics["loss"] == 0.0 and metrics["trained_trajectories"] == 0
    assert metrics["trajectories"] == len(adv)


def test_gradient_clipping(tiny_model, tokenizer):
    prompts, rows, adv = random_trees(len(tokenizer), tokenizer.bos_token_id, n_trees=4, seed=2)
    units = build_units(prompts, rows, {k: (1.0 if i % 2 else -1.0) for i, k in enumerate(adv)})
    before = {k: v.detach().clone() for k, v in tiny_model.named_parameters()}
    metrics = policy_update(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=1.0), units,
                            _cfg(grad_clip=1e-4), tokenizer.pad_token_id, seed=0)
    delta = math.sqrt(sum(float(((before[k] - v) ** 2).sum()) for k, v in tiny_model.named_parameters()))
    assert metrics["grad_norm"] > 1e-4  # the reported norm is the one before clipping
    assert delta == pytest.approx(1e-4, rel=1e-2)


def test_kl_needs_a_reference_model(tiny_model, tokenizer):
    prompts, rows, adv = random_trees(len(tokenizer), tokenizer.bos_token_id, n_trees=2, seed=2)
    with pytest.raises(ValueError, match="reference"):
        policy_update(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=1.0), build_units(prompts, rows, adv),
                      _cfg(kl_coef=0.1), tokenizer.pad_token_id, seed=0)


class _IgnoresCustomMasks(torch.nn.Module):
    """A model family that drops custom attention masks (a stand-in for one without 4D-mask support)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids)


def test_a_model_ignoring_4d_masks_falls_back_to_the_duplicated_form(tiny_model, tokenizer):
    assert packed_attention_supported(tiny_model, tokenizer.pad_token_id)
    wrapped = _IgnoresCustomMasks(tiny_model)
    assert not packed_attention_supported(wrapped, tokenizer.pad_token_id)
    prompts, rows, adv = random_trees(len(tokenizer), tokenizer.bos_token_id, n_trees=2, seed=4)
    metrics = policy_update(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), build_units(prompts, rows, adv),
                            _cfg(), tokenizer.pad_token_id, seed=0)
    assert metrics["packed"] == 0.0


def test_sampled_trees_train_with_matching_logprobs(policy, tokenizer, retriever, questions):
    """End to end on real trees: the packed trainer's log-probs agree with the sampler's on every trainable
    token, so token/mask/log-prob alignment is right; an update then changes the model."""
    model = copy.deepcopy(policy)
    backend = HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    env = SearchEnv(retriever, tokenizer)
    qs = questions["train"][:4]
    prompts = {q["prompt_id"]: prompt_ids(tokenizer, q["prompt"]) for q in qs}
    trees = sample_trees(backend, env, list(prompts.items()), SamplingConfig(), AgentConfig(max_total_tokens=160),
                         seed=0)
    nodes = node_rows(trees, 0)
    rng = random.Random(0)
    rewards = {(r["prompt_id"], r["tree_id"], r["node_id"]): rng.choice([0.0, 1.0]) for r in nodes if r["is_leaf"]}
    adv = leaf_advantages(rewards, "tree")
    units = build_units(prompts, nodes, adv)
    assert sum(len(u.paths) for u in units) == len(rewards) == len(trees) * 3
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    metrics = policy_update(model, torch.optim.Adam(model.parameters(), lr=1e-3), units, TrainConfig(),
                            tokenizer.pad_token_id, seed=0)
    assert metrics["packed"] == 1.0
    assert metrics["logprob_mismatch"] < 1e-4
    assert metrics["unique_tokens"] < metrics["duplicated_tokens"]
    if any(a != 0 for a in adv.values()):
        assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert not model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernels need a CUDA device "
                    "here (torch 2.13's CPU template fails to compile); scripts/gpu_check_flex.py runs this check")
def test_flex_attention_block_mask_gives_the_dense_mask_result(tiny_model, tokenizer):
    """The FlexAttention path (a BlockMask, no dense T×T tensor) computes the dense 4D mask's packed loss and
    gradients."""
    prompts, rows, adv = random_trees(len(tokenizer), tokenizer.bos_token_id, n_trees=6, seed=8)
    units = build_units(prompts, rows, adv)
    cfg = _cfg()
    model = tiny_model.cuda()
    dense, g_dense, _ = _loss_and_grads(model, model, units, "packed", cfg, tokenizer.pad_token_id, 3)
    flex_model = copy.deepcopy(model)
    flex_model.set_attn_implementation("flex_attention")
    flex, g_flex, _ = _loss_and_grads(flex_model, model, units, "packed", cfg, tokenizer.pad_token_id, 3)
    assert abs(flex["loss"] - dense["loss"]) <= 1e-5 * dense["loss_scale"]
    assert _max_rel_diff(g_flex, g_dense) <= 1e-5


def test_per_node_process_advantages_apply_once_per_token(tiny_model, tokenizer):
    """estimator `process`: every trainable token carries its node's advantage once; the packed loss and
    gradients equal a float64 reference that scores each node's tokens once, token-mean over unique tokens."""
    prompts, rows, adv = random_trees(len(tokenizer), tokenizer.bos_token_id, n_trees=4, seed=6)
    rng = random.Random(1)
    node_adv = {(r["prompt_id"], r["tree_id"], r["node_id"]): rng.uniform(-1, 1) for r in rows}
    weights = {k: (max(a, 0.0), min(a, 0.0), 1) for k, a in node_adv.items()}
    units = build_units(prompts, rows, {}, node_weights=weights)
    cfg = _cfg()
    with pytest.raises(ValueError, match="token-mean"):
        leaf_scales(units, "seq-mean-token-mean", 1)
    with pytest.raises(ValueError, match="packed"):
        make_rows(units, "duplicated", [torch.ones(len(u.paths)) for u in units])
    packed, g_packed, _ = _loss_and_grads(tiny_model, tiny_model, units, "packed", cfg, tokenizer.pad_token_id, 5)

    old_model = copy.deepcopy(tiny_model).double()
    model = copy.deepcopy(tiny_model)
    _perturb(model, 0.15, 5)
    model = model.double()
    by_key = {(r["prompt_id"], r["tree_id"], r["node_id"]): r for r in rows}
    n_unique = sum(sum(r["loss_mask"]) for r in rows)
    total = 0.0
    for key, row in by_key.items():  # each node once, read from the sequence of its own path
        path, nid = [], key[2]
        while nid is not None:
            path.append(by_key[(key[0], key[1], nid)])
            nid = path[-1]["parent_id"]
        ids = list(prompts[key[0]])
        for r in reversed(path[1:]):
            ids += r["token_ids"]
        start = len(ids)
        ids = torch.tensor(ids + row["token_ids"])
        t = torch.tensor([start + i for i, m in enumerate(row["loss_mask"]) if m])

        def logp(m, ids=ids, t=t):
            return torch.log_softmax(m(input_ids=ids[None]).logits[0], -1)[t - 1].gather(-1, ids[t][:, None])[:, 0]

        with torch.no_grad():
            old = logp(old_model)
        r = torch.exp(logp(model) - old)
        a = node_adv[key]
        obj = a * (torch.clamp(r, max=1 + cfg.clip_high) if a > 0 else
                   torch.clamp(torch.clamp(r, min=1 - cfg.clip_low), max=cfg.dual_clip))
        loss = -obj.sum() / n_unique
        loss.backward()
        total += float(loss.detach())
    g_ref = {k: v.float() for k, v in _grads(model).items()}
    assert abs(packed["loss"] - total) <= 1e-4 * packed["loss_scale"]
    assert _max_rel_diff(g_packed, g_ref) <= 1e-4
