"""sampling.forest: node keys, paths, leaves, responses, sibling sets and values on a hand-made forest, the errors
that name a node, and the prompt token ids a sample output saves."""

from __future__ import annotations

import pytest

from arborl.components.artifacts import schemas, storage
from arborl.components.sampling.forest import Forest, NodeKey, leaf_key, node_key, read_prompt_tokens


def _node(pid: str, tid: int, nid: int, parent: int | None, text: str, leaf: bool) -> dict:
    return {"prompt_id": pid, "tree_id": tid, "node_id": nid, "parent_id": parent, "text": text, "is_leaf": leaf}


# prompt p: tree 0 = a → {b, c}, c → {d, e}; tree 1 = f (a one-step chain). prompt q: tree 0 = g → h.
ROWS = [
    _node("p", 0, 0, None, "a", False), _node("p", 0, 1, 0, "b", True), _node("p", 0, 2, 0, "c", False),
    _node("p", 0, 3, 2, "d", True), _node("p", 0, 4, 2, "e", True), _node("p", 1, 0, None, "f", True),
    _node("q", 0, 0, None, "g", False), _node("q", 0, 1, 0, "h", True),
]


def test_keys_paths_leaves_and_responses():
    forest = Forest.from_rows(ROWS)
    d = NodeKey("p", 0, 3)
    assert d == ("p", 0, 3) and repr(d) == "('p', 0, 3)" and node_key(ROWS[3]) == d
    assert leaf_key({"prompt_id": "p", "tree_id": 0, "leaf_id": 3}) == d
    assert forest.path(d) == [("p", 0, 0), ("p", 0, 2), ("p", 0, 3)] and forest.parent(("p", 1, 0)) is None
    assert forest.leaves() == [("p", 0, 1), ("p", 0, 3), ("p", 0, 4), ("p", 1, 0), ("q", 0, 1)]  # row order
    assert forest.response(d) == "a c d" and forest.response(NodeKey("p", 1, 0)) == "f"
    assert forest.parents()[("p", 0, 4)] == 2 and forest.parents()[("q", 0, 0)] is None
    assert list(forest.trees()) == [("p", 0), ("p", 1), ("q", 0)] and list(forest.trees()[("p", 0)]) == [0, 1, 2, 3, 4]


def test_sibling_sets_hang_every_first_step_under_the_prompt():
    sets = list(Forest.from_rows(ROWS).sibling_sets())
    assert sets == [
        ("p", None, [("p", 0, 0), ("p", 1, 0)]),  # the prompt is a branch point: two trees' first steps
        ("p", ("p", 0, 0), [("p", 0, 1), ("p", 0, 2)]),
        ("p", ("p", 0, 2), [("p", 0, 3), ("p", 0, 4)]),
    ]  # q has one tree and no branching: no sibling set


def test_values_are_mean_leaf_rewards_and_extreme_paths_follow_them():
    rewards = [{"prompt_id": "p", "tree_id": 0, "leaf_id": leaf, "reward": r} for leaf, r in ((1, 0.0), (3, 1.0),
                                                                                            (4, 0.5))]
    rewards += [{"prompt_id": "p", "tree_id": 1, "leaf_id": 0, "reward": 0.25},
                {"prompt_id": "q", "tree_id": 0, "leaf_id": 1, "reward": 1.0}]
    forest = Forest.from_rows(ROWS).with_rewards(rewards)
    assert forest.values[("p", 0, 2)] == pytest.approx(0.75) and forest.values[("p", 0, 0)] == pytest.approx(0.5)
    assert forest.extreme_path(NodeKey("p", 0, 0), best=True) == [("p", 0, 0), ("p", 0, 2), ("p", 0, 3)]
    assert forest.extreme_path(NodeKey("p", 0, 0), best=False) == [("p", 0, 0), ("p", 0, 1)]
    with pytest.raises(ValueError, match=r"rewards: leaf \('p', 0, 4\) has no reward row"):
        Forest.from_rows(ROWS).with_rewards(rewards[:2])


def test_a_broken_forest_names_the_node():
    with pytest.raises(ValueError, match=r"node \('p', 0, 1\) has parent_id 7, which is not a node of its tree"):
        Forest.from_rows([ROWS[0], {**ROWS[1], "parent_id": 7}])
    with pytest.raises(ValueError, match="duplicate"):
        Forest.from_rows([ROWS[0], ROWS[0]])


def test_prompt_tokens_are_read_back_and_an_older_output_has_none(tmp_path):
    out = str(tmp_path / "sample")
    assert read_prompt_tokens(out) is None  # an output written before the file existed
    schemas.write([{"prompt_id": "p", "token_ids": [1, 5, 9]}], schemas.PROMPT_TOKENS,
                  storage.join(out, schemas.PROMPT_TOKENS_FILE))
    assert read_prompt_tokens(out) == {"p": [1, 5, 9]}
