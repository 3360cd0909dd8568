"""components.training.warmstart: demo tokenisation with loss masks and the supervised warm start."""

from __future__ import annotations

import math
import random

import pytest
import torch

from arborl.components.config import ModelConfig, WarmstartConfig
from arborl.components.envs.demos import demonstration
from arborl.components.training.models import build_model, encode
from arborl.components.training.warmstart import pack_rows, packed_batch, supervised_train, tokenize_demo

SEGMENTS = [
    ("<question> where was kai born ? </question>", False),
    (" <search> kai born </search>", True),
    (" <information> kai was born in paris . </information>", False),
    (" <answer> paris </answer>", True),
]


def test_tokenize_demo_masks_by_segment(tokenizer, world):
    person, city = world.people[0], world.cities[0]
    segments = [(text.replace("kai", person).replace("paris", city), learn) for text, learn in SEGMENTS]
    ids, trainable = tokenize_demo(tokenizer, segments)
    assert ids[0] == tokenizer.bos_token_id and trainable[0] is False
    assert len(ids) == len(trainable)
    pos = 1
    for text, learn in segments:
        toks = encode(tokenizer, text)
        assert ids[pos : pos + len(toks)] == toks
        assert trainable[pos : pos + len(toks)] == [learn] * len(toks)
        pos += len(toks)
    assert pos == len(ids)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids[1:]) == " ".join(text.strip() for text, _ in segments)
    learned = tokenizer.convert_ids_to_tokens([i for i, m in zip(ids, trainable, strict=True) if m])
    assert learned[0] == "<search>" and learned[-1] == "</answer>" and "<information>" not in learned


def _masked_ce(model, demo) -> float:
    """Mean next-token cross-entropy over the trainable targets of one demo (independent of HF's labels)."""
    ids, trainable = demo
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    terms = [-float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if trainable[t]]
    return sum(terms) / len(terms)


@pytest.fixture
def demos(tokenizer, questions, retriever, fact_index, entities_by_type):
    rng = random.Random(0)
    episodes = [
        demonstration(q, retriever, fact_index, entities_by_type, rng, 0.0, 0.0) for q in questions["train"][:4]
    ]
    return [tokenize_demo(tokenizer, ep) for ep in episodes]


def test_first_loss_is_the_masked_cross_entropy(tiny_model, tokenizer, demos):
    """With one demo repeated the first batch is deterministic: its loss is the CE on trainable tokens only."""
    expected = _masked_ce(tiny_model, demos[0])
    metrics = supervised_train(tiny_model, [demos[0]], WarmstartConfig(steps=1, batch_size=3, lr=1e-3),
                               tokenizer.pad_token_id, seed=0)
    assert metrics["loss_first"] == pytest.approx(expected, rel=1e-4)
    # and it differs from the CE over every token, so the mask matters
    ids, trainable = demos[0]
    assert expected != pytest.approx(_masked_ce(tiny_model, (ids, [True] * len(ids))), rel=1e-3)


def test_supervised_train_lowers_the_loss(tiny_model, tokenizer, demos):
    before = [_masked_ce(tiny_model, d) for d in demos]
    calls = []
    metrics = supervised_train(tiny_model, demos, WarmstartConfig(steps=40, batch_size=4, lr=1e-2),
                               tokenizer.pad_token_id, seed=0, on_step=lambda *a: calls.append(a))
    after = [_masked_ce(tiny_model, d) for d in demos]
    assert sum(after) < 0.5 * sum(before)
    assert metrics["loss_final"] < 0.5 * metrics["loss_first"]
    assert metrics["steps"] == 40
    assert [c[:2] for c in calls] == [(i, 40) for i in range(1, 41)]
    assert all(math.isfinite(c[2]) for c in calls)
    assert not tiny_model.training


def test_supervised_train_is_reproducible(tokenizer, demos):
    results = []
    for _ in range(2):
        model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer, 0)
        supervised_train(model, demos, WarmstartConfig(steps=3, batch_size=2, lr=1e-2), tokenizer.pad_token_id, 0)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_zero_steps_is_a_no_op(tiny_model, tokenizer, demos):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    metrics = supervised_train(tiny_model, demos, WarmstartConfig(steps=0), tokenizer.pad_token_id, 0)
    assert math.isnan(metrics["loss_first"]) and metrics["steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters(), strict=True))


def test_pack_rows_is_first_fit_decreasing_within_the_longest():
    lengths = [5, 40, 20, 30, 10, 20, 5]
    rows = pack_rows([([1] * n, [False] * n) for n in lengths])
    assert [[lengths[i] for i in row] for row in rows] == [[40], [30, 10], [20, 20], [5, 5]]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))


def test_packed_batch_matches_separate_demos(tokenizer, demos):
    """Independent reference: each demo alone through the model, unpadded, in float64. The packed batch's
    mean trainable-token loss and its gradients equal the mean over those separate forward passes."""
    short = [(ids[:12], trainable[:12]) for ids, trainable in demos[:3]]  # prefixes: several fit in a row
    batch = demos + short + [demos[1]]  # a repeat, as the sampler draws with replacement
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                        tokenizer, 0).double()
    total, count = 0.0, 0
    for ids, trainable in batch:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        target = torch.tensor(ids[1:])
        keep = torch.tensor(trainable[1:])
        total = total + torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    (total / count).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    ids, pos, mask, targets = packed_batch(batch, tokenizer.pad_token_id, torch.float64)
    assert ids.shape[0] < len(batch) and ids.shape[1] == max(len(d[0]) for d in batch)
    assert int((targets != -100).sum()) == count
    logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    assert float(loss) == pytest.approx(float(total / count), rel=1e-10)
    for a, b in zip(reference, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
