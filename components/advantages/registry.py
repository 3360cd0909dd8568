"""Advantage estimators by name (docs/design.md, Advantages): what each computes and what it needs from training.

An estimator is registered under a name with its kind:

* `leaf` — one advantage per trajectory (per rewarded leaf), spread over every trainable token of the
  leaf's path; a node on the paths of k leaves carries (A⁺, A⁻, k) (see `estimators.node_weights`).
* `node` — one advantage per node, applied once to that node's tokens: (max(A, 0), min(A, 0), 1). The trainer
  applies such weights only in the packed form with token-mean aggregation, so a `node` estimator always
  needs train.form 'packed' and train.loss_aggregation 'token-mean'.

A `leaf` estimator may also restrict train.form and train.loss_aggregation. The config checks the chosen
`advantage.estimator` against `train` when it is validated (`check_training`); the label stage computes
advantages through `label_advantages` and writes the estimator's name next to them, and the train stage looks
the name up again to tell per-node from per-leaf advantages.

Every estimator is a function `(rewards, parents, eps) -> advantages`: `rewards` maps each rewarded leaf
(prompt_id, tree_id, node_id) to its reward, `parents` maps every node (prompt_id, tree_id, node_id) to its
parent node_id (None for a first step), and the result maps each leaf (kind `leaf`) or each node (kind
`node`) to its advantage. This module imports no torch. It checks `advantage.estimator` for the config
(config/choices.py): the name is registered and can train with the train section's form and aggregation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from arborl.components.advantages.estimators import (
    LeafKey,
    NodeKey,
    grouped_advantages,
    node_weights,
    process_advantages,
)
from arborl.components.config import choices

LEAF, NODE = "leaf", "node"
KINDS = (LEAF, NODE)
NODE_FORM, NODE_AGGREGATIONS = "packed", ("token-mean",)  # how the trainer applies per-node weights

Compute = Callable[[Mapping[LeafKey, float], Mapping[NodeKey, int | None], float], dict[tuple[str, int, int], float]]


@dataclass(frozen=True)
class Estimator:
    """A registered advantage estimator.

    `form`: the train.form it needs (None: any); `aggregations`: the train.loss_aggregation values it allows
    (None: any); `help`: one line for the config's help text.
    """

    name: str
    kind: str
    compute: Compute
    help: str
    form: str | None = None
    aggregations: tuple[str, ...] | None = None

    @property
    def per_node(self) -> bool:
        """True when the advantages are per node (applied once to each node's tokens), not per leaf."""
        return self.kind == NODE

    def training_problem(self, form: str, aggregation: str) -> str | None:
        """Why train.form `form` with train.loss_aggregation `aggregation` cannot train this estimator's
        advantages (naming the config keys), or None when they can."""
        if self.form is not None and form != self.form:
            return f"advantage.estimator {self.name!r} needs train.form {self.form!r}, got {form!r}"
        if self.aggregations is not None and aggregation not in self.aggregations:
            allowed = " or ".join(repr(a) for a in self.aggregations)
            return (f"advantage.estimator {self.name!r} needs train.loss_aggregation {allowed}, "
                    f"got {aggregation!r}")
        return None

    def describe(self) -> str:
        """`name = help`, with the training it needs."""
        needs = []
        if self.form is not None:
            needs.append(f"train.form {self.form}")
        if self.aggregations is not None:
            needs.append("train.loss_aggregation " + " or ".join(self.aggregations))
        return f"{self.name} = {self.help}" + (f" (needs {', '.join(needs)})" if needs else "")


_REGISTRY: dict[str, Estimator] = {}


def register_estimator(
    name: str,
    *,
    kind: str,
    help: str,  # noqa: A002 - the field is the estimator's help text
    form: str | None = None,
    aggregations: tuple[str, ...] | None = None,
) -> Callable[[Compute], Compute]:
    """Decorator: register `fn(rewards, parents, eps) -> advantages` under `name` (see the module docstring).

    A `node` estimator gets train.form 'packed' and train.loss_aggregation 'token-mean' (the only training
    the trainer has for per-node weights); declaring anything else for it, a kind other than `leaf`/`node`
    or a name already registered raises ValueError.
    """
    if kind not in KINDS:
        raise ValueError(f"estimator {name!r}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if name in _REGISTRY:
        raise ValueError(f"advantage estimator {name!r} is already registered")
    if kind == NODE:
        if form not in (None, NODE_FORM) or (aggregations is not None and tuple(aggregations) != NODE_AGGREGATIONS):
            raise ValueError(f"estimator {name!r}: per-node advantages train only with train.form {NODE_FORM!r} "
                             f"and train.loss_aggregation {NODE_AGGREGATIONS[0]!r}")
        form, aggregations = NODE_FORM, NODE_AGGREGATIONS
    allowed = None if aggregations is None else tuple(aggregations)

    def add(fn: Compute) -> Compute:
        _REGISTRY[name] = Estimator(name, kind, fn, help, form, allowed)
        return fn

    return add


def unregister_estimator(name: str) -> Estimator:
    """Remove `name` from the registry and return it (KeyError when it is not registered)."""
    return _REGISTRY.pop(name)


def estimator_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def get_estimator(name: str) -> Estimator:
    """The estimator registered as `name`; ValueError listing the choices when there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def describe_estimators() -> str:
    """One help line for all registered estimators."""
    return "; ".join(e.describe() for e in _REGISTRY.values()) + "."


def check_training(name: str, form: str, aggregation: str) -> None:
    """ValueError naming the config keys when estimator `name` cannot train with train.form `form` and
    train.loss_aggregation `aggregation` (or when `name` is not registered)."""
    problem = get_estimator(name).training_problem(form, aggregation)
    if problem is not None:
        raise ValueError(problem)


@choices.register_value("advantage.estimator")
def _check_name(name: str) -> None:
    get_estimator(name)


@choices.register_config("advantage.estimator")
def _check_fits_training(cfg: Any) -> None:
    check_training(cfg.advantage.estimator, cfg.train.form, cfg.train.loss_aggregation)


def leaf_advantages(
    rewards: Mapping[LeafKey, float], estimator: str, eps: float = 1e-6,
    parents: Mapping[NodeKey, int | None] | None = None,
) -> dict[LeafKey, float]:
    """Advantage per leaf from the `leaf` estimator named `estimator`; ValueError for an unknown name or a
    per-node estimator. `parents` is only needed by estimators that look at the tree (the built-in ones
    group leaves by their keys alone)."""
    est = get_estimator(estimator)
    if est.per_node:
        raise ValueError(f"advantage estimator {estimator!r} gives per-node advantages, not per-leaf ones")
    return est.compute(rewards, parents or {}, eps)


@dataclass(frozen=True)
class Labels:
    """What the label stage writes for one estimator.

    `weights`: (A⁺, A⁻, multiplicity) per node; `leaf_advantages`: advantage per rewarded leaf (empty for a
    per-node estimator); `advantages`: the estimator's own output, per leaf or per node (for metrics).
    """

    estimator: Estimator
    weights: dict[NodeKey, tuple[float, float, int]]
    leaf_advantages: dict[LeafKey, float]
    advantages: dict[tuple[str, int, int], float]


def label_advantages(
    name: str, parents: Mapping[NodeKey, int | None], rewards: Mapping[LeafKey, float], eps: float = 1e-6
) -> Labels:
    """Advantages of estimator `name` and the per-node weights they give (see the module docstring).

    Per-leaf: every node sums the advantages of the leaves below it (`node_weights`). Per-node: each node the
    estimator gives an advantage A carries it once, (max(A, 0), min(A, 0), 1).
    """
    est = get_estimator(name)
    adv = est.compute(rewards, parents, eps)
    if est.per_node:
        unknown = [k for k in adv if k not in parents]
        if unknown:
            raise KeyError(f"estimator {name!r} gave an advantage for {unknown[0]}, which is not a node")
        weights = {k: (max(a, 0.0), min(a, 0.0), 1) for k, a in adv.items()}
        return Labels(est, weights, {}, adv)
    return Labels(est, node_weights(parents, adv), adv, adv)


# --- the built-in estimators (same order as the config's help text) -------------------------------------------


@register_estimator("tree", kind=LEAF, help="A_intra + A_inter (Tree-GRPO)")
def _tree(rewards, parents, eps):
    intra, inter = grouped_advantages(rewards, "tree", eps), grouped_advantages(rewards, "prompt", eps)
    return {k: intra[k] + inter[k] for k in rewards}


@register_estimator("tree_intra", kind=LEAF, help="normalise over the leaves of each tree (A_intra)")
def _tree_intra(rewards, parents, eps):
    return grouped_advantages(rewards, "tree", eps)


@register_estimator("tree_inter", kind=LEAF, help="normalise over all leaves of the prompt's trees (A_inter)")
def _tree_inter(rewards, parents, eps):
    return grouped_advantages(rewards, "prompt", eps)


@register_estimator("grpo", kind=LEAF, help="normalise over all trajectories of a prompt (GRPO)")
def _grpo(rewards, parents, eps):
    return grouped_advantages(rewards, "prompt", eps)


@register_estimator("dr_grpo", kind=LEAF, help="centre over all trajectories of a prompt, no std (Dr.GRPO)")
def _dr_grpo(rewards, parents, eps):
    return grouped_advantages(rewards, "prompt", eps, scale=False)


@register_estimator(
    "process", kind=NODE,
    help="TreeRL per-node advantage ((V(n)−V(root)) + (V(n)−V(parent)))/sqrt(leaves under n), applied once per node",
)
def _process(rewards, parents, eps):
    return process_advantages(parents, rewards)
