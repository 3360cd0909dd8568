"""components.training.packing: depth-first serialisation, tree attention, per-token weights."""

from __future__ import annotations

import math

import pytest
import torch

from arborl.components.advantages.estimators import node_weights
from arborl.components.training.packing import (
    build_units,
    greedy_microbatches,
    leaf_scales,
    packed_inputs,
    token_weights,
)

NAN = math.nan


def _node(tree, node, parent, ids, mask):
    return {"prompt_id": "p", "tree_id": tree, "node_id": node, "parent_id": parent, "token_ids": ids,
            "loss_mask": mask, "logprobs": [-0.1 * (i + 1) if m else NAN for i, m in enumerate(mask)]}


# tree 0:  prompt [1 10 11] ─ n0 [20 21 | 22] ─┬─ n1 [30 31]          (leaf)
#                                            └─ n2 [40 | 41 42] ─ n3 [50]   (leaf)
# tree 1:  prompt ─ n0 [60] (leaf)
HAND = [
    _node(0, 0, None, [20, 21, 22], [True, True, False]),
    _node(0, 1, 0, [30, 31], [True, True]),
    _node(0, 2, 0, [40, 41, 42], [True, False, False]),
    _node(0, 3, 2, [50], [True]),
    _node(1, 0, None, [60], [True]),
]
ADV = {("p", 0, 1): 0.5, ("p", 0, 3): -1.0, ("p", 1, 0): 0.0}


def test_depth_first_serialisation_by_hand():
    units = build_units({"p": [1, 10, 11]}, HAND[::-1], ADV)  # row order does not matter
    u = units[0]
    assert u.key == ("p", 0) and units[1].key == ("p", 1)
    assert u.input_ids.tolist() == [1, 10, 11, 20, 21, 22, 30, 31, 40, 41, 42, 50]
    assert u.positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9]
    # a node's first token is predicted from its parent's last token
    assert u.pred.tolist() == [-1, 0, 1, 2, 3, 4, 5, 6, 5, 8, 9, 10]
    assert u.trainable.tolist() == [False] * 3 + [True, True, False, True, True, True, False, False, True]
    assert [p.tolist() for p in u.paths] == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]]
    assert u.leaf_ids == [1, 3] and u.leaf_advantages.tolist() == [0.5, -1.0]
    assert u.num_tokens == 12 and u.duplicated_tokens == 18
    assert u.path_trainable().tolist() == [4, 4]
    assert torch.isnan(u.sampler_logprobs[:3]).all() and u.sampler_logprobs[3].item() == pytest.approx(-0.1)
    # every path, read through the unique tokens, is the duplicated trajectory
    assert u.input_ids[u.paths[1]].tolist() == [1, 10, 11, 20, 21, 22, 40, 41, 42, 50]
    assert u.positions[u.paths[1]].tolist() == list(range(10))


def test_attention_mask_sees_own_node_and_ancestors_only():
    u = build_units({"p": [1, 10, 11]}, HAND, ADV)[0]
    _, _, mask = packed_inputs([u], pad_id=0, dtype=torch.float32)
    allowed = (mask[0, 0] == 0)
    n1 = [6, 7]
    n2 = [8, 9, 10]
    assert allowed[7, :8].all() and not allowed[7, 8:].any()  # n1 sees prompt, n0, itself
    assert not allowed[8][n1].any() and allowed[8, :6].all() and allowed[8, 8]  # n2 never sees its sibling
    assert allowed[11][n2].all() and not allowed[11][n1].any()  # n3 sees its parent n2, not n1
    assert not allowed[6, 7]  # causal inside a node


def test_padded_rows_attend_to_themselves():
    units = build_units({"p": [1, 10, 11]}, HAND, ADV)
    ids, pos, mask = packed_inputs(units, pad_id=0, dtype=torch.float32)
    assert ids.shape == (2, 12) and ids[1, 4:].eq(0).all()
    assert (mask[1, 0, 5] == 0).sum() == 1 and mask[1, 0, 5, 5] == 0


def test_token_weights_equal_the_label_stage_node_weights():
    u = build_units({"p": [1, 10, 11]}, HAND, ADV)[0]
    a_pos, a_neg, mult = token_weights(u, torch.ones(2, dtype=torch.float64))
    parents = {("p", n["tree_id"], n["node_id"]): n["parent_id"] for n in HAND}
    label = node_weights(parents, ADV)
    node_of = [None] * 3 + [0, 0, 0, 1, 1, 2, 2, 2, 3]
    for t, node in enumerate(node_of):
        if not u.trainable[t]:
            assert a_pos[t] == a_neg[t] == mult[t] == 0
            continue
        w = label[("p", 0, node)]
        assert (a_pos[t].item(), a_neg[t].item(), mult[t].item()) == (w[0], w[1], w[2])


def test_leaf_scales_per_aggregation():
    units = build_units({"p": [1, 10, 11]}, HAND, ADV)
    scales, d = leaf_scales(units, "token-mean", 99)
    assert [s.tolist() for s in scales] == [[1.0, 1.0], [1.0]] and d == 4 + 4 + 1
    scales, d = leaf_scales(units, "seq-mean-token-mean", 99)
    assert [s.tolist() for s in scales] == [[0.25, 0.25], [1.0]] and d == 3
    scales, d = leaf_scales(units, "seq-mean-token-sum-norm", 99)
    assert [s.tolist() for s in scales] == [[1.0, 1.0], [1.0]] and d == 3 * 99
    with pytest.raises(ValueError, match="aggregation"):
        leaf_scales(units, "sum", 1)


def test_trees_without_labelled_leaves_are_dropped_and_bad_rows_named():
    units = build_units({"p": [1]}, HAND, {("p", 1, 0): 1.0})
    assert [u.key for u in units] == [("p", 1)]
    with pytest.raises(KeyError, match="'p', 0, 9"):
        build_units({"p": [1]}, HAND, {("p", 0, 9): 1.0})
    with pytest.raises(KeyError, match="prompt 'p'"):
        build_units({}, HAND, ADV)


def test_greedy_microbatches_respect_the_token_budget():
    units = build_units({"p": [1, 10, 11]}, HAND, ADV)  # 12 and 4 tokens
    assert [[u.key for u in mb] for mb in greedy_microbatches(units, 24)] == [[("p", 0), ("p", 1)]]
    assert [len(mb) for mb in greedy_microbatches(units, 23)] == [1, 1]
    assert [len(mb) for mb in greedy_microbatches(units[::-1], 5)] == [1, 1]  # too long: alone
