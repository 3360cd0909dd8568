"""Trees as training units: every token stored once (packed form) or every root→leaf path as its own
sequence (duplicated form), with the per-token advantage weights of docs/design.md (Tree packing).

A `TreeUnit` holds the unique tokens of one sampled tree in depth-first order: the prompt first, then each
node's tokens right after its parent's subtree position. A token may attend to the earlier tokens of its
own node and to every token of its ancestor nodes (the prompt is the root ancestor); its position id is
its index along its own root→leaf path. A token's log-prob is read from the logits at its *predecessor*:
the previous token of its path, which for a node's first token is the last token of the parent node — so
one parent position predicts the first token of every child.

Per-token weights. A leaf j with advantage A_j and scale s_j (set by the loss aggregation, see
`leaf_scales`) adds s_j·max(A_j, 0) to A⁺, s_j·min(A_j, 0) to A⁻ and s_j to the multiplicity weight m of
every trainable token on its path. With s_j = 1 these are the label stage's (A⁺, A⁻, k). Because the
clipped objective is linear in A within each sign, the packed sum over unique tokens equals the sum over
duplicated trajectories exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from arborl.components.sampling.forest import Forest

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class TreeUnit:
    """One tree, tokens stored once. U = unique tokens (prompt included), P = nodes + 1 (index 0 = prompt)."""

    key: tuple[str, int]  # (prompt_id, tree_id)
    input_ids: torch.Tensor  # (U,) long
    positions: torch.Tensor  # (U,) long: index along the token's own root→leaf path
    segment: torch.Tensor  # (U,) long: which node (0 = prompt) each token belongs to
    ancestors: torch.Tensor  # (P, P) bool: ancestors[a, b] = node b is node a or one of its ancestors
    pred: torch.Tensor  # (U,) long: index of the token whose logits predict this one (-1 for the first)
    trainable: torch.Tensor  # (U,) bool: model-written tokens (loss targets)
    sampler_logprobs: torch.Tensor  # (U,) float: behaviour log-probs, NaN where not trainable
    paths: list[torch.Tensor]  # per leaf: (L_j,) long indices into the unique tokens, root→leaf
    leaf_ids: list[int]  # node_id of each leaf, aligned with `paths`
    leaf_advantages: torch.Tensor  # (n_leaves,) float
    segment_nodes: list[int | None] | None = None  # node_id of each segment (index 0: the prompt, None)
    node_weights: torch.Tensor | None = None  # (U, 3) float64 A⁺, A⁻, m per token, for per-node advantages

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def duplicated_tokens(self) -> int:
        return sum(int(p.numel()) for p in self.paths)

    def path_trainable(self) -> torch.Tensor:
        """(n_leaves,) trainable tokens on each root→leaf path."""
        return torch.tensor([int(self.trainable[p].sum()) for p in self.paths], dtype=torch.long)


def build_units(
    prompt_tokens: dict[str, list[int]],
    nodes: list[dict],
    leaf_advantage: dict[tuple[str, int, int], float],
    node_weights: dict[tuple[str, int, int], tuple[float, float, float]] | None = None,
) -> list[TreeUnit]:
    """Group `nodes` rows (docs/design.md, Data contracts) by tree and serialise each depth-first. Trees without a
    labelled leaf are dropped; a leaf advantage whose node is missing raises KeyError naming it.

    `node_weights` (per-node estimators such as `process`): (A⁺, A⁻, m) for every node, applied to its
    trainable tokens as they are; `leaf_advantage` is then ignored and every tree is kept."""
    by_tree = Forest.from_rows(nodes).trees()
    labelled = node_weights if node_weights is not None else leaf_advantage
    for pid, tid, nid in labelled:
        if nid not in by_tree.get((pid, tid), {}):
            raise KeyError(f"advantage for node {(pid, tid, nid)} has no node row")
    units = []
    for key in sorted(by_tree):
        rows = by_tree[key]
        if node_weights is not None:
            parents = {r["parent_id"] for r in rows.values()}
            leaves = sorted(nid for nid in rows if nid not in parents)
            advs = [0.0] * len(leaves)
        else:
            leaves = sorted(nid for (pid, tid, nid) in leaf_advantage if (pid, tid) == key)
            advs = [leaf_advantage[(*key, leaf)] for leaf in leaves]
        if not leaves:
            continue
        if key[0] not in prompt_tokens:
            raise KeyError(f"nodes of prompt {key[0]!r} have no prompt tokens")
        unit = _serialise(key, prompt_tokens[key[0]], rows, leaves, advs)
        if node_weights is not None:
            unit.node_weights = _per_token(unit, key, node_weights)
        units.append(unit)
    return units


def _per_token(unit: TreeUnit, key, weights) -> torch.Tensor:
    """(U, 3) per-token (A⁺, A⁻, m) from per-node weights, zero off the trainable tokens."""
    out = torch.zeros((unit.num_tokens, 3), dtype=torch.float64)
    for t, seg in enumerate(unit.segment.tolist()):
        if seg and unit.trainable[t]:
            node = (*key, unit.segment_nodes[seg])
            if node not in weights:
                raise KeyError(f"node {node} has no advantage row")
            out[t] = torch.tensor(weights[node], dtype=torch.float64)
    return out


def _serialise(key, prompt: list[int], rows: dict[int, dict], leaves: list[int], advs: list[float]) -> TreeUnit:
    children: dict[int | None, list[int]] = {}
    for nid in sorted(rows):
        children.setdefault(rows[nid]["parent_id"], []).append(nid)
    ids, pos, seg, pred, train, logp = [], [], [], [], [], []
    ids += prompt
    pos += list(range(len(prompt)))
    seg += [0] * len(prompt)
    pred += list(range(-1, len(prompt) - 1))
    train += [False] * len(prompt)
    logp += [math.nan] * len(prompt)
    slot = {None: 0}  # node_id → segment index (0 = prompt)
    span: dict[int | None, tuple[int, int]] = {None: (0, len(prompt))}  # node → [start, end) in the unit
    parent_of = {None: None}
    stack = list(reversed(children.get(None, [])))
    while stack:
        nid = stack.pop()
        row = rows[nid]
        parent = row["parent_id"]
        parent_of[nid] = parent
        slot[nid] = len(slot)
        start = len(ids)
        p_start, p_end = span[parent]
        depth_pos = pos[p_end - 1] + 1
        toks = list(row["token_ids"])
        if not toks:
            raise ValueError(f"node {(*key, nid)} has no tokens")
        ids += toks
        pos += list(range(depth_pos, depth_pos + len(toks)))
        seg += [slot[nid]] * len(toks)
        pred += [p_end - 1] + list(range(start, start + len(toks) - 1))
        train += [bool(m) for m in row["loss_mask"]]
        logp += [float(x) for x in row["logprobs"]]
        span[nid] = (start, len(ids))
        stack.extend(reversed(children.get(nid, [])))
    n_seg = len(slot)
    anc = torch.zeros((n_seg, n_seg), dtype=torch.bool)
    for nid, s in slot.items():
        a = nid
        while True:
            anc[s, slot[a]] = True
            if a is None:
                break
            a = parent_of[a]
    paths = []
    for leaf in leaves:
        chain, a = [], leaf
        while a is not None:
            chain.append(a)
            a = parent_of[a]
        idx = list(range(*span[None]))
        for a in reversed(chain):
            idx += list(range(*span[a]))
        paths.append(torch.tensor(idx, dtype=torch.long))
    return TreeUnit(
        key=key,
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(pos, dtype=torch.long),
        segment=torch.tensor(seg, dtype=torch.long),
        ancestors=anc,
        pred=torch.tensor(pred, dtype=torch.long),
        trainable=torch.tensor(train, dtype=torch.bool),
        sampler_logprobs=torch.tensor(logp, dtype=torch.float32),
        paths=paths,
        leaf_ids=leaves,
        leaf_advantages=torch.tensor(advs, dtype=torch.float64),
        segment_nodes=[nid for nid, _ in sorted(slot.items(), key=lambda kv: kv[1])],
    )


def leaf_scales(units: list[TreeUnit], aggregation: str, horizon: int) -> tuple[list[torch.Tensor], float]:
    """Per-leaf scale s_j and the batch divisor D, so that loss = −Σ_tokens obj(s·A) / D.

    * token-mean: s_j = 1, D = trainable tokens of all trajectories (counted with multiplicity).
    * seq-mean-token-mean: s_j = 1/|trainable tokens of j|, D = number of trajectories.
    * seq-mean-token-sum-norm (Dr.GRPO): s_j = 1, D = trajectories × `horizon` (a constant token count).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if any(u.node_weights is not None for u in units):
        if aggregation != "token-mean":
            raise ValueError(f"per-node advantages (a per-node estimator such as 'process') train with "
                             f"train.loss_aggregation token-mean, not {aggregation!r}")
        # each trainable token once, weighted by its node's multiplicity m
        divisor = sum(float(u.node_weights[:, 2].sum()) for u in units)
        return [torch.ones(len(u.paths), dtype=torch.float64) for u in units], divisor
    lengths = [u.path_trainable().double() for u in units]
    n_traj = sum(len(x) for x in lengths)
    if aggregation == "token-mean":
        return [torch.ones_like(x) for x in lengths], float(sum(float(x.sum()) for x in lengths))
    if aggregation == "seq-mean-token-mean":
        return [1.0 / x.clamp(min=1) for x in lengths], float(n_traj)
    return [torch.ones_like(x) for x in lengths], float(n_traj * horizon)


def token_weights(
    unit: TreeUnit, scale: torch.Tensor, advantages: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A⁺, A⁻, m) per unique token, each (U,) float64; zero off the trainable tokens. `advantages`
    (n_leaves,) replaces the unit's leaf advantages (their signs give counts of positive/negative paths)."""
    if unit.node_weights is not None:  # per-node advantages: the weights are given per token
        w = unit.node_weights
        if advantages is not None:  # counts: one "trajectory" per token, signed by its node's advantage
            return (w[:, 0] > 0).double(), -(w[:, 1] < 0).double(), (w[:, 2] > 0).double()
        return w[:, 0].clone(), w[:, 1].clone(), w[:, 2].clone()
    advantages = unit.leaf_advantages if advantages is None else advantages
    a_pos = torch.zeros(unit.num_tokens, dtype=torch.float64)
    a_neg = torch.zeros_like(a_pos)
    mult = torch.zeros_like(a_pos)
    for path, adv, s in zip(unit.paths, advantages.tolist(), scale.tolist(), strict=True):
        if adv > 0:
            a_pos.index_add_(0, path, torch.full((len(path),), s * adv, dtype=torch.float64))
        elif adv < 0:
            a_neg.index_add_(0, path, torch.full((len(path),), s * adv, dtype=torch.float64))
        mult.index_add_(0, path, torch.full((len(path),), s, dtype=torch.float64))
    off = ~unit.trainable
    a_pos[off], a_neg[off], mult[off] = 0.0, 0.0, 0.0
    return a_pos, a_neg, mult


def packed_inputs(
    units: list[TreeUnit], pad_id: int, dtype: torch.dtype, dense_mask: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded batch of packed trees: input_ids (B, T), position_ids (B, T) and an additive 4D
    attention mask (B, 1, T, T) of `dtype` (0 = attend, dtype's min = blocked; None unless `dense_mask`).
    Padding attends to itself."""
    width = max(u.num_tokens for u in units)
    b = len(units)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    for i, u in enumerate(units):
        ids[i, : u.num_tokens] = u.input_ids
        pos[i, : u.num_tokens] = u.positions
    if not dense_mask:
        return ids, pos, None
    allowed = torch.eye(width, dtype=torch.bool).repeat(b, 1, 1)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for i, u in enumerate(units):
        n = u.num_tokens
        allowed[i, :n, :n] = u.ancestors[u.segment[:, None], u.segment[None, :]] & causal[:n, :n]
    mask = torch.zeros((b, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return ids, pos, mask


def greedy_microbatches(units: list[TreeUnit], max_tokens: int) -> list[list[TreeUnit]]:
    """Pack units, in the given order, into micro-batches whose padded size (rows × longest) stays within
    `max_tokens`; a unit longer than that gets a micro-batch of its own."""
    batches: list[list[TreeUnit]] = []
    cur: list[TreeUnit] = []
    longest = 0
    for u in units:
        new_longest = max(longest, u.num_tokens)
        if cur and new_longest * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, new_longest = [], u.num_tokens
        cur.append(u)
        longest = new_longest
    if cur:
        batches.append(cur)
    return batches


MAX_FLEX_NODES = 63  # a token's ancestor set is one int64 bitmask


def flex_tree_mask(units: list[TreeUnit], width: int, device: torch.device | str):
    """The same tree attention as `packed_inputs`' dense mask, as a FlexAttention BlockMask over a (B, T)
    right-padded batch: no T×T tensor is materialised, and fully masked blocks are skipped. Each token
    carries its node's ancestor set as a bitmask, so the mask function needs only 2D lookups."""
    from torch.nn.attention.flex_attention import create_block_mask

    b = len(units)
    seg = torch.zeros((b, width), dtype=torch.long)
    bits = torch.zeros((b, width), dtype=torch.long)  # bit j set: node j is the token's node or an ancestor
    length = torch.zeros(b, dtype=torch.long)
    for i, u in enumerate(units):
        p = u.ancestors.shape[0]
        if p > MAX_FLEX_NODES:
            raise ValueError(f"tree {u.key} has {p} nodes; the FlexAttention mask supports {MAX_FLEX_NODES}")
        node_bits = (u.ancestors.long() << torch.arange(p)).sum(-1)  # (P,)
        seg[i, : u.num_tokens] = u.segment
        bits[i, : u.num_tokens] = node_bits[u.segment]
        length[i] = u.num_tokens
    seg, bits, length = seg.to(device), bits.to(device), length.to(device)

    def tree(batch, head, q, kv):
        visible = ((bits[batch, q] >> seg[batch, kv]) & 1) == 1
        return ((q < length[batch]) & (kv <= q) & visible) | (q == kv)

    return create_block_mask(tree, b, None, width, width, device=str(device))
