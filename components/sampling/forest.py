"""One reader for the sampled trees: node rows (the `nodes` Parquet contract) as a typed forest.

Every stage after sampling reads the trees through `Forest`: verify joins each leaf's root→leaf texts, label
hands the parent links to the estimators and walks sibling sets for preferences, train groups nodes by tree,
and the viewer draws them. All trees of one prompt hang under one common root, the prompt itself: the first
steps of every tree are siblings of each other. With the leaves' rewards attached (`with_rewards`), V(n), the
mean reward of the leaves under n, is known for every node.

The sample stage also writes the prompt token ids it sampled from (`prompt_tokens.parquet`), so a later stage
reads the exact prompt instead of tokenizing it again (`read_prompt_tokens`; None for an output written
before that file existed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from arborl.components.artifacts import schemas, storage


class NodeKey(NamedTuple):
    """A node's identity across the forest (equal to the plain tuple (prompt_id, tree_id, node_id))."""

    prompt_id: str
    tree_id: int
    node_id: int

    def __repr__(self) -> str:  # as the plain tuple, so messages naming a node read the same
        return repr(tuple(self))


def node_key(row: dict) -> NodeKey:
    """The key of a row with `prompt_id`, `tree_id` and `node_id` (nodes, advantages)."""
    return NodeKey(row["prompt_id"], row["tree_id"], row["node_id"])


def leaf_key(row: dict) -> NodeKey:
    """The key of the leaf a `rewards` row scores (its `leaf_id`)."""
    return NodeKey(row["prompt_id"], row["tree_id"], row["leaf_id"])


@dataclass
class Forest:
    """The node rows of many trees by key, with each node's children, each prompt's first steps and, once
    rewards are attached, every node's value V(n)."""

    nodes: dict[NodeKey, dict]
    children: dict[NodeKey, list[NodeKey]] = field(default_factory=dict)
    first_steps: dict[str, list[NodeKey]] = field(default_factory=dict)  # the prompt root's children
    values: dict[NodeKey, float] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> Forest:
        """Index node rows; ValueError naming the node for a duplicate key or a parent that is not in its tree.
        Keys keep the rows' order; children and first steps are in key order."""
        rows = list(rows)
        forest = cls({node_key(n): n for n in rows})
        if len(forest.nodes) != len(rows):
            raise ValueError("nodes: duplicate (prompt_id, tree_id, node_id) rows")
        forest.children = {k: [] for k in forest.nodes}
        first: dict[str, list[NodeKey]] = defaultdict(list)
        for key in sorted(forest.nodes):
            parent = forest.parent(key)
            if parent is None:
                first[key.prompt_id].append(key)
            elif parent not in forest.nodes:
                raise ValueError(f"nodes: node {tuple(key)} has parent_id {parent.node_id}, which is not a node of "
                                 "its tree")
            else:
                forest.children[parent].append(key)
        forest.first_steps = dict(first)
        return forest

    @classmethod
    def read(cls, nodes_dir: str) -> Forest:
        """The forest of a sample output directory (its nodes.parquet)."""
        return cls.from_rows(schemas.read(storage.join(nodes_dir, schemas.NODES_FILE), schemas.NODES).to_pylist())

    def parent(self, key: NodeKey) -> NodeKey | None:
        parent = self.nodes[key]["parent_id"]
        return None if parent is None else NodeKey(key.prompt_id, key.tree_id, parent)

    def parents(self) -> dict[NodeKey, int | None]:
        """Every node's parent node_id (None for a first step): what the advantage estimators take."""
        return {key: n["parent_id"] for key, n in self.nodes.items()}

    def path(self, key: NodeKey) -> list[NodeKey]:
        """Nodes from the first step down to `key`."""
        out: list[NodeKey] = []
        cur: NodeKey | None = key
        while cur is not None:
            out.append(cur)
            cur = self.parent(cur)
        return out[::-1]

    def leaves(self) -> list[NodeKey]:
        """The leaves (`is_leaf`), in row order."""
        return [key for key, n in self.nodes.items() if n["is_leaf"]]

    def response(self, key: NodeKey) -> str:
        """The texts of the nodes from the first step to `key`, joined by single spaces (a trajectory's text)."""
        return " ".join(self.nodes[k]["text"] for k in self.path(key))

    def trees(self) -> dict[tuple[str, int], dict[int, dict]]:
        """{(prompt_id, tree_id): {node_id: row}}, in row order."""
        out: dict[tuple[str, int], dict[int, dict]] = {}
        for key, n in self.nodes.items():
            out.setdefault((key.prompt_id, key.tree_id), {})[key.node_id] = n
        return out

    def sibling_sets(self) -> Iterator[tuple[str, NodeKey | None, list[NodeKey]]]:
        """(prompt_id, branch node — None for the prompt, children) for every branch point, in a stable order."""
        for pid in sorted(self.first_steps):
            if len(self.first_steps[pid]) >= 2:
                yield pid, None, self.first_steps[pid]
        for key in sorted(self.children):
            if len(self.children[key]) >= 2:
                yield key.prompt_id, key, self.children[key]

    def extreme_path(self, key: NodeKey, best: bool) -> list[NodeKey]:
        """`key`, then at each step its highest-value (best) or lowest-value child, down to a leaf."""
        out = [key]
        while self.children[out[-1]]:
            pick = max if best else min
            out.append(pick(self.children[out[-1]], key=lambda c: self.values[c]))  # first one wins ties
        return out

    def with_rewards(self, rewards: Iterable[dict]) -> Forest:
        """Attach the leaves' rewards (`rewards` rows) and compute V(n) for every node; returns the forest.

        ValueError naming the node when a leaf has no reward, a reward has no leaf, or a non-leaf node has no
        leaf below it."""
        reward = {}
        for r in rewards:
            key = leaf_key(r)
            if key not in self.nodes or not self.nodes[key]["is_leaf"]:
                raise ValueError(f"rewards: leaf_id {tuple(key)} is not a leaf node")
            reward[key] = float(r["reward"])
        total: dict[NodeKey, float] = defaultdict(float)
        count: dict[NodeKey, int] = defaultdict(int)
        for key in self.leaves():
            if key not in reward:
                raise ValueError(f"rewards: leaf {tuple(key)} has no reward row")
            for anc in self.path(key):
                total[anc] += reward[key]
                count[anc] += 1
        for key in self.nodes:
            if count[key] == 0:
                raise ValueError(f"nodes: non-leaf node {tuple(key)} has no leaf below it")
            self.values[key] = total[key] / count[key]
        return self


def write_prompt_tokens(trees: Iterable, uri: str, keep: set[str] | None = None) -> int:
    """Write (prompt_id, token_ids) of the sampled trees' prompts (each once, first-seen order; only those in
    `keep` when given) to `uri`; returns the row count."""
    seen: dict[str, list[int]] = {}
    for tree in trees:
        if tree.prompt_id not in seen and (keep is None or tree.prompt_id in keep):
            seen[tree.prompt_id] = list(tree.prompt_ids)
    return schemas.write([{"prompt_id": p, "token_ids": ids} for p, ids in seen.items()], schemas.PROMPT_TOKENS, uri)


def read_prompt_tokens(nodes_dir: str) -> dict[str, list[int]] | None:
    """{prompt_id: token ids} the sample output at `nodes_dir` sampled from; None when it predates the file."""
    uri = storage.join(nodes_dir, schemas.PROMPT_TOKENS_FILE)
    if not storage.exists(uri):
        return None
    return {r["prompt_id"]: r["token_ids"] for r in schemas.read(uri, schemas.PROMPT_TOKENS).to_pylist()}
