"""components.advantages.registry: estimators by name, their kind and training needs, and the label entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from arborl.components.advantages import registry
from arborl.components.advantages.estimators import grouped_advantages, node_weights, process_advantages
from arborl.components.advantages.registry import (
    check_training,
    describe_estimators,
    estimator_names,
    get_estimator,
    label_advantages,
    leaf_advantages,
    register_estimator,
    unregister_estimator,
)

BUILT_IN = ("tree", "tree_intra", "tree_inter", "grpo", "dr_grpo", "process")
FORMS = ("packed", "duplicated")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# prompt "a": tree 0 is n0 ─┬─ n1 (leaf, 1.0)      tree 1 is n0 ─┬─ n1 (leaf, 0.0)
#                           └─ n2 ─ n3 (leaf, 0.0)               └─ n2 (leaf, 1.0)
# prompt "b": tree 0 is a single chain n0 ─ n1 (leaf, 0.5)
PARENTS = {
    ("a", 0, 0): None, ("a", 0, 1): 0, ("a", 0, 2): 0, ("a", 0, 3): 2,
    ("a", 1, 0): None, ("a", 1, 1): 0, ("a", 1, 2): 0,
    ("b", 0, 0): None, ("b", 0, 1): 0,
}
REWARDS = {("a", 0, 1): 1.0, ("a", 0, 3): 0.0, ("a", 1, 1): 0.0, ("a", 1, 2): 1.0, ("b", 0, 1): 0.5}


@pytest.fixture
def scratch_names():
    """Names registered by a test are removed afterwards, whatever happens."""
    added: list[str] = []
    yield added
    for name in added:
        registry._REGISTRY.pop(name, None)


def test_built_in_estimators_in_order_with_their_kind_and_needs():
    assert estimator_names() == BUILT_IN
    for name in BUILT_IN[:-1]:
        est = get_estimator(name)
        assert (est.kind, est.per_node, est.form, est.aggregations) == ("leaf", False, None, None), name
    process = get_estimator("process")
    assert (process.kind, process.per_node, process.form, process.aggregations) == ("node", True, "packed",
                                                                                     ("token-mean",))
    for name in BUILT_IN:
        assert get_estimator(name).name == name and get_estimator(name).help.strip()


def test_description_lists_every_estimator_and_the_needs_of_process():
    text = describe_estimators()
    for name in BUILT_IN:
        assert f"{name} = {get_estimator(name).help}" in text
    assert "needs train.form packed, train.loss_aggregation token-mean" in text


@pytest.mark.parametrize("name", ["ppo", "", "Tree", None])
def test_unknown_name_lists_the_choices(name):
    with pytest.raises(ValueError, match="unknown advantage estimator") as err:
        get_estimator(name)
    assert ", ".join(BUILT_IN) in str(err.value)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_training_needs(form, aggregation):
    for name in BUILT_IN[:-1]:
        check_training(name, form, aggregation)  # per-leaf estimators train in every form and aggregation
    if form == "packed" and aggregation == "token-mean":
        check_training("process", form, aggregation)
        return
    with pytest.raises(ValueError) as err:
        check_training("process", form, aggregation)
    msg = str(err.value)
    assert msg.startswith("advantage.estimator 'process' needs ")
    if form != "packed":
        assert "train.form 'packed', got 'duplicated'" in msg
    else:
        assert f"train.loss_aggregation 'token-mean', got {aggregation!r}" in msg


def test_label_advantages_per_leaf_matches_the_math():
    for name in BUILT_IN[:-1]:
        labels = label_advantages(name, PARENTS, REWARDS, 1e-6)
        assert labels.estimator is get_estimator(name)
        assert set(labels.leaf_advantages) == set(REWARDS)
        assert labels.advantages == labels.leaf_advantages
        assert labels.weights == node_weights(PARENTS, labels.leaf_advantages)
        assert labels.leaf_advantages == leaf_advantages(REWARDS, name, 1e-6)
    grpo = label_advantages("grpo", PARENTS, REWARDS, 1e-6).leaf_advantages
    assert grpo == grouped_advantages(REWARDS, "prompt", 1e-6)
    assert grpo[("b", 0, 1)] == 0.0  # a size-1 group
    dr = label_advantages("dr_grpo", PARENTS, REWARDS).leaf_advantages
    assert dr[("a", 0, 1)] == pytest.approx(0.5) and dr[("a", 0, 3)] == pytest.approx(-0.5)
    intra = label_advantages("tree_intra", PARENTS, REWARDS).leaf_advantages
    inter = label_advantages("tree_inter", PARENTS, REWARDS).leaf_advantages
    tree = label_advantages("tree", PARENTS, REWARDS).leaf_advantages
    assert tree == {k: intra[k] + inter[k] for k in REWARDS}


def test_label_advantages_per_node_is_process():
    labels = label_advantages("process", PARENTS, REWARDS)
    expected = process_advantages(PARENTS, REWARDS)
    assert labels.leaf_advantages == {} and labels.advantages == expected
    assert labels.weights == {k: (max(a, 0.0), min(a, 0.0), 1) for k, a in expected.items()}
    assert labels.weights[("a", 0, 1)] == pytest.approx((1.0, 0.0, 1))  # V = 1 under V(root) = V(n0) = 0.5
    assert labels.weights[("a", 0, 2)] == pytest.approx((0.0, -1.0, 1))


def test_leaf_advantages_refuses_a_per_node_estimator():
    with pytest.raises(ValueError, match="'process' gives per-node advantages"):
        leaf_advantages(REWARDS, "process")


def test_a_fresh_leaf_estimator_is_usable_by_the_label_entry_point(scratch_names):
    """A leaf estimator registered here: the reward minus 0.25, using the tree structure it is given."""
    seen = []

    @register_estimator("minus_quarter", kind="leaf", help="reward − 0.25", aggregations=("token-mean",))
    def minus_quarter(rewards, parents, eps):
        seen.append(parents)
        return {k: r - 0.25 for k, r in rewards.items()}

    scratch_names.append("minus_quarter")
    assert "minus_quarter" in estimator_names() and "minus_quarter = reward − 0.25" in describe_estimators()
    labels = label_advantages("minus_quarter", PARENTS, REWARDS, 1e-6)
    assert seen == [PARENTS]
    assert labels.leaf_advantages == {k: r - 0.25 for k, r in REWARDS.items()}
    # n0 of tree a/0 lies on the paths of leaves 1 (+0.75) and 3 (−0.25); n2 only on leaf 3's
    assert labels.weights[("a", 0, 0)] == (0.75, -0.25, 2)
    assert labels.weights[("a", 0, 2)] == (0.0, -0.25, 1)
    check_training("minus_quarter", "duplicated", "token-mean")
    with pytest.raises(ValueError, match="'minus_quarter' needs train.loss_aggregation 'token-mean', got 'seq-mean"):
        check_training("minus_quarter", "packed", "seq-mean-token-mean")

    removed = unregister_estimator("minus_quarter")
    assert removed.compute is minus_quarter and "minus_quarter" not in estimator_names()
    with pytest.raises(ValueError, match="unknown advantage estimator 'minus_quarter'"):
        label_advantages("minus_quarter", PARENTS, REWARDS)


def test_a_fresh_node_estimator_gives_per_node_weights(scratch_names):
    @register_estimator("depth_bonus", kind="node", help="+1 on first steps, −0.5 elsewhere")
    def depth_bonus(rewards, parents, eps):
        return {k: 1.0 if p is None else -0.5 for k, p in parents.items()}

    scratch_names.append("depth_bonus")
    est = get_estimator("depth_bonus")
    assert est.per_node and (est.form, est.aggregations) == ("packed", ("token-mean",))
    labels = label_advantages("depth_bonus", PARENTS, REWARDS)
    assert labels.leaf_advantages == {}
    assert labels.weights == {k: (1.0, 0.0, 1) if p is None else (0.0, -0.5, 1) for k, p in PARENTS.items()}
    with pytest.raises(ValueError, match="'depth_bonus' needs train.form 'packed'"):
        check_training("depth_bonus", "duplicated", "token-mean")


def test_a_node_estimator_advantage_off_the_tree_is_an_error(scratch_names):
    @register_estimator("stray", kind="node", help="one advantage for a node that does not exist")
    def stray(rewards, parents, eps):
        return {("z", 9, 9): 1.0}

    scratch_names.append("stray")
    with pytest.raises(KeyError, match="not a node"):
        label_advantages("stray", PARENTS, REWARDS)


def test_registration_errors(scratch_names):
    def fn(rewards, parents, eps):
        return {}

    with pytest.raises(ValueError, match="already registered"):
        register_estimator("tree", kind="leaf", help="again")(fn)
    assert get_estimator("tree").compute is not fn
    with pytest.raises(ValueError, match="kind must be one of leaf, node"):
        register_estimator("odd", kind="edge", help="?")
    with pytest.raises(ValueError, match="per-node advantages train only with train.form 'packed'"):
        register_estimator("node_dup", kind="node", help="?", form="duplicated")
    with pytest.raises(ValueError, match="token-mean"):
        register_estimator("node_seq", kind="node", help="?", aggregations=("seq-mean-token-mean",))
    assert not {"odd", "node_dup", "node_seq"} & set(estimator_names())
    with pytest.raises(KeyError):
        unregister_estimator("never_registered")


def test_registry_imports_no_torch_and_checks_the_config_estimator():
    probe = ("import sys; import arborl.components.advantages.registry as r; "
             "from arborl.components.config import choices; "
             "print('torch' in sys.modules, len(r.estimator_names()), "
             "choices.check_value('advantage.estimator', 'grpo'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "6", "grpo"]
