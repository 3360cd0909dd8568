"""components.training.trainer: trajectory building and the clipped policy-gradient update."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from components.advantages.estimators import leaf_advantages
from components.config import AgentConfig, SamplingConfig, TrainConfig
from components.models import prompt_ids
from components.sampling.agent import SearchEnv
from components.sampling.backend import HFBackend
from components.sampling.tree import node_rows, sample_trees
from components.training.trainer import Trajectory, build_trajectories, policy_update

NAN = math.nan


def _node(tree, node, parent, ids, mask, logps):
    return {"prompt_id": "p", "tree_id": tree, "node_id": node, "parent_id": parent, "token_ids": ids,
            "loss_mask": mask, "logprobs": logps}


HAND_NODES = [
    _node(0, 0, None, [20, 21, 22], [True, True, False], [-0.1, -0.2, NAN]),
    _node(0, 1, 0, [30, 31], [True, True], [-0.3, -0.4]),
    _node(0, 2, 0, [40, 41, 42], [True, False, False], [-0.5, NAN, NAN]),
    _node(1, 0, None, [50], [True], [-0.6]),
]


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


def test_build_trajectories_by_hand():
    nodes = HAND_NODES[:]
    random.Random(0).shuffle(nodes)  # row order does not matter
    adv = {("p", 0, 2): -1.0, ("p", 1, 0): 0.0, ("p", 0, 1): 0.5}
    trajs = build_trajectories({"p": [1, 10, 11]}, nodes, adv)
    assert [t.advantage for t in trajs] == [0.5, -1.0, 0.0]  # sorted by (prompt, tree, leaf)
    assert trajs[0].input_ids == [1, 10, 11, 20, 21, 22, 30, 31]
    assert trajs[0].trainable == [False, False, False, True, True, False, True, True]
    assert _same(trajs[0].sampler_logprobs, [NAN, NAN, NAN, -0.1, -0.2, NAN, -0.3, -0.4])
    assert trajs[1].input_ids == [1, 10, 11, 20, 21, 22, 40, 41, 42]
    assert trajs[1].trainable == [False, False, False, True, True, False, True, False, False]
    assert _same(trajs[1].sampler_logprobs, [NAN, NAN, NAN, -0.1, -0.2, NAN, -0.5, NAN, NAN])
    assert trajs[2].input_ids == [1, 10, 11, 50]
    assert trajs[2].trainable == [False, False, False, True]


def test_build_trajectories_with_unknown_node_errors():
    with pytest.raises(KeyError):
        build_trajectories({"p": [1]}, HAND_NODES, {("p", 0, 7): 1.0})


# --- policy_update ----------------------------------------------------------------------------------------


def _trajectories(vocab: int, bos: int, advantages: list[float], seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    out = []
    for a in advantages:
        n_prompt, n_gen = rng.randint(2, 5), rng.randint(3, 9)
        ids = [bos] + [rng.randrange(4, vocab) for _ in range(n_prompt + n_gen)]
        gen = [rng.random() < 0.7 for _ in range(n_gen)]
        gen[0] = True
        trainable = [False] * (1 + n_prompt) + gen
        out.append(Trajectory(ids, trainable, a, [-1.0 if m else NAN for m in trainable]))
    return out


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"grad_clip": 1e9, "micro_batch_size": 2, **kw})


def _token_logps(model, traj: Trajectory) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([traj.input_ids])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(traj.input_ids[1:])[:, None]).squeeze(-1)


def _ppo(ratio, a, cfg: TrainConfig):
    obj = torch.minimum(ratio * a, torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * a)
    return torch.maximum(obj, torch.full_like(obj, cfg.dual_clip * a)) if a < 0 else obj


def _reference_step(model, trajs, old: dict[int, torch.Tensor], cfg: TrainConfig) -> float:
    """Accumulate into model's .grad the gradient of −Σ PPO(r)·mask / Σ mask, one unpadded sequence at a time."""
    n_tokens = sum(sum(t.trainable[1:]) for t in trajs)
    total = 0.0
    for t in trajs:
        lp = _token_logps(model, t)
        mask = torch.tensor(t.trainable[1:], dtype=torch.float64)
        ratio = torch.exp(lp - old[id(t)])
        loss = -(_ppo(ratio, t.advantage, cfg) * mask).sum() / n_tokens
        loss.backward()
        total += loss.item()
    return total


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_zero_advantages_change_nothing(tiny_model, tokenizer):
    trajs = _trajectories(len(tokenizer), tokenizer.bos_token_id, [0.0, 0.0, 0.0])
    before = _params(tiny_model)
    opt = torch.optim.Adam(tiny_model.parameters(), lr=0.1)
    metrics = policy_update(tiny_model, opt, trajs, _cfg(), tokenizer.pad_token_id, seed=0)
    for k, v in _params(tiny_model).items():
        assert torch.equal(v, before[k]), k
    assert metrics["loss"] == 0.0 and metrics["trained_trajectories"] == 0
    assert metrics["trajectories"] == 3
    assert metrics["trainable_tokens"] == sum(sum(t.trainable[1:]) for t in trajs)


def test_first_step_gradient_equals_token_mean_reference(tiny_model, tokenizer):
    torch.manual_seed(0)
    advantages = [1.0, -0.5, 0.0, 2.0, -1.5]  # the zero-advantage trajectory still counts in the normaliser
    trajs = _trajectories(len(tokenizer), tokenizer.bos_token_id, advantages)
    # sampler log-probs a known 0.25 away from the model's on every trainable token
    with torch.no_grad():
        for t in trajs:
            lp = _token_logps(tiny_model, t).tolist()
            t.sampler_logprobs = [NAN] + [x + 0.25 if m else NAN for x, m in zip(lp, t.trainable[1:], strict=True)]
    reference = copy.deepcopy(tiny_model)
    before = _params(tiny_model)

    opt = torch.optim.SGD(tiny_model.parameters(), lr=1.0)
    metrics = policy_update(tiny_model, opt, trajs, _cfg(), tokenizer.pad_token_id, seed=0)

    with torch.no_grad():
        old = {id(t): _token_logps(reference, t) for t in trajs}
    ref_loss = _reference_step(reference, trajs, old, _cfg())
    n_tokens = sum(sum(t.trainable[1:]) for t in trajs)
    assert ref_loss == pytest.approx(-sum(t.advantage * sum(t.trainable[1:]) for t in trajs) / n_tokens, rel=1e-6)

    after = _params(tiny_model)
    ref_grads = {k: p.grad for k, p in reference.named_parameters()}
    for k in before:
        torch.testing.assert_close(before[k] - after[k], ref_grads[k].float(), rtol=1e-3, atol=1e-6, msg=k)
    ref_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in ref_grads.values()))
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert metrics["logprob_mismatch"] == pytest.approx(0.25, abs=1e-4)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["clip_frac"] == 0.0
    assert metrics["trained_trajectories"] == 4 and metrics["trajectories"] == 5


@pytest.mark.parametrize("micro_batch_size", [1, 64])
def test_micro_batching_does_not_change_the_step(tiny_model, tokenizer, micro_batch_size):
    trajs = _trajectories(len(tokenizer), tokenizer.bos_token_id, [1.0, -0.5, 0.0, 2.0, -1.5], seed=1)
    twin = copy.deepcopy(tiny_model)
    policy_update(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=1.0), trajs, _cfg(micro_batch_size=2),
                  tokenizer.pad_token_id, seed=0)
    policy_update(twin, torch.optim.SGD(twin.parameters(), lr=1.0), trajs, _cfg(micro_batch_size=micro_batch_size),
                  tokenizer.pad_token_id, seed=0)
    for (k, a), (_, b) in zip(tiny_model.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)


def test_gradient_clipping(tiny_model, tokenizer):
    trajs = _trajectories(len(tokenizer), tokenizer.bos_token_id, [1.0, -1.0, 0.5])
    before = _params(tiny_model)
    metrics = policy_update(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=1.0), trajs,
                            _cfg(grad_clip=1e-4), tokenizer.pad_token_id, seed=0)
    delta = math.sqrt(sum(float(((before[k] - v) ** 2).sum()) for k, v in _params(tiny_model).items()))
    assert metrics["grad_norm"] > 1e-4  # the reported norm is the one before clipping
    assert delta == pytest.approx(1e-4, rel=1e-2)


def test_two_mini_batches_use_the_old_logprobs_from_before_the_update(tiny_model, tokenizer):
    """Second mini-batch: ratios against the log-probs recomputed once at the start, its own token-mean
    normaliser, PPO clipping — checked against a step-by-step reference."""
    cfg = _cfg(mini_batches=2)
    lr, seed = 1.0, 5
    trajs = _trajectories(len(tokenizer), tokenizer.bos_token_id, [1.0, -0.5, 0.0, 2.0, -1.5, 0.7], seed=2)
    reference = copy.deepcopy(tiny_model)
    metrics = policy_update(tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=lr), trajs, cfg,
                            tokenizer.pad_token_id, seed=seed)

    with torch.no_grad():
        old = {id(t): _token_logps(reference, t) for t in trajs}
    order = trajs[:]
    random.Random(seed).shuffle(order)
    size = math.ceil(len(order) / 2)
    for m in range(0, len(order), size):
        reference.zero_grad(set_to_none=True)
        _reference_step(reference, order[m : m + size], old, cfg)
        with torch.no_grad():
            for p in reference.parameters():
                if p.grad is not None:
                    p -= lr * p.grad.float()
    for (k, a), (_, b) in zip(tiny_model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=k)
    # the second step really saw ratios away from 1, some of them clipped
    assert abs(metrics["ratio_mean"] - 1.0) > 0.01 and metrics["clip_frac"] > 0


def test_sampled_trees_train_with_matching_logprobs(policy, tokenizer, retriever, questions):
    """End to end on real trees: sampler and trainer log-probs agree on every trainable token, so the
    trajectories' token/mask/log-prob alignment is right; an update then changes the model."""
    model = copy.deepcopy(policy)
    backend = HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    env = SearchEnv(retriever, tokenizer)
    rows = questions["train"][:4]
    prompts = {q["prompt_id"]: prompt_ids(tokenizer, q["prompt"]) for q in rows}
    trees = sample_trees(backend, env, list(prompts.items()), SamplingConfig(), AgentConfig(max_total_tokens=160),
                         seed=0)
    nodes = node_rows(trees, 0)
    rng = random.Random(0)
    rewards = {(r["prompt_id"], r["tree_id"], r["node_id"]): rng.choice([0.0, 1.0]) for r in nodes if r["is_leaf"]}
    adv = leaf_advantages(rewards, "tree")
    trajs = build_trajectories(prompts, nodes, adv)
    assert len(trajs) == len(rewards) == len(trees) * 3
    before = _params(model)
    metrics = policy_update(model, torch.optim.Adam(model.parameters(), lr=1e-3), trajs, TrainConfig(),
                            tokenizer.pad_token_id, seed=0)
    assert metrics["logprob_mismatch"] < 1e-4
    assert set(metrics) >= {"loss", "grad_norm", "logprob_mismatch", "clip_frac", "ratio_mean"}
    if any(a != 0 for a in adv.values()):
        assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert not model.training
