"""Explicit, versioned Arrow schemas of every Parquet artifact (docs/design.md, Data contracts).

The version is stored in each file's schema metadata and checked on read, so a file written by an
incompatible version fails with a clear message instead of a KeyError deep in a stage.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from arborl.components.artifacts import storage

SCHEMA_VERSION = "1"

# Each Parquet artifact's file name stands beside its schema below. The stages' other files:
WORLD_FILE = "world.json"  # prepare: the world's people and entities (`World.to_json`)
PROMPT_STATS_FILE = "prompt_stats.json"  # sample: per-prompt counts and the reason a prompt is bad
GRANULARITY_FILE = "granularity.json"  # label: the per-depth granularity report
TREES_FILE = "trees.html"  # label: the tree viewer


def _schema(name: str, fields: list[pa.Field], version: str = SCHEMA_VERSION) -> pa.Schema:
    return pa.schema(fields, metadata={"arborl.schema": name, "arborl.schema_version": version})


FACTS_FILE = "facts.parquet"
FACTS = _schema(
    "facts",
    [
        pa.field("doc_id", pa.int32(), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("relation", pa.string(), nullable=False),
        pa.field("object", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ],
)

PROMPTS_FILE = "prompts.parquet"
PROMPTS = _schema(
    "prompts",
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("data_source", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # the text of the last user message
        pa.field("messages", pa.string(), nullable=False),  # JSON [{"role", "content"}]: the chat fed to the model
        pa.field("ability", pa.string(), nullable=False),
        pa.field("reward_model", pa.string(), nullable=False),  # JSON {"style", "ground_truth"} as in the source
        pa.field("ground_truth", pa.list_(pa.string()), nullable=False),  # the targets
        pa.field("split", pa.string(), nullable=False),
        pa.field("extra_info", pa.string(), nullable=False),  # JSON; synthetic: hops, subject, relation path, chain
    ],
    version="2",  # 2: chat messages, ability and reward_model of verl / Search-R1 Parquet rows
)

NODES_FILE = "nodes.parquet"
NODES = _schema(
    "nodes",
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("tree_id", pa.int32(), nullable=False),
        pa.field("node_id", pa.int32(), nullable=False),
        pa.field("parent_id", pa.int32(), nullable=True),  # null for a first agent step
        pa.field("depth", pa.int32(), nullable=False),  # 1 for a first step
        pa.field("expansion_round", pa.int32(), nullable=False),  # 0 = initial chain
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),  # false on observation tokens
        pa.field("logprobs", pa.list_(pa.float32()), nullable=False),  # behaviour policy; NaN where masked
        pa.field("text", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),  # search / answer / invalid
        pa.field("is_leaf", pa.bool_(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=True),  # leaves: answer / eos / max_turns / length / budget
        pa.field("policy_version", pa.int32(), nullable=False),
    ],
)

PROMPT_TOKENS_FILE = "prompt_tokens.parquet"  # sample: the prompt token ids the trees grew from
PROMPT_TOKENS = _schema(
    "prompt_tokens",
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    ],
)

REWARDS_FILE = "rewards.parquet"
REWARDS = _schema(
    "rewards",
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("tree_id", pa.int32(), nullable=False),
        pa.field("leaf_id", pa.int32(), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=False),
        pa.field("f1", pa.float32(), nullable=False),
        pa.field("verifier", pa.string(), nullable=False),
        pa.field("details", pa.string(), nullable=False),  # JSON
        pa.field("error", pa.string(), nullable=True),
    ],
)

ADVANTAGES_FILE = "advantages.parquet"
ADVANTAGES = _schema(
    "advantages",
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("tree_id", pa.int32(), nullable=False),
        pa.field("node_id", pa.int32(), nullable=False),
        pa.field("adv_pos", pa.float32(), nullable=False),  # Σ positive leaf advantages through this node
        pa.field("adv_neg", pa.float32(), nullable=False),  # Σ negative leaf advantages through this node
        pa.field("multiplicity", pa.int32(), nullable=False),  # leaves under this node
        pa.field("leaf_advantage", pa.float32(), nullable=True),  # leaves only
        pa.field("estimator", pa.string(), nullable=False),
    ],
)

EVAL_FILE = "eval.parquet"
EVAL = _schema(
    "eval",
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("data_source", pa.string(), nullable=False),
        pa.field("hops", pa.int32(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),  # greedy / sampled
        pa.field("sample", pa.int32(), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("em", pa.float32(), nullable=False),
        pa.field("f1", pa.float32(), nullable=False),
        pa.field("answer", pa.string(), nullable=True),
        pa.field("valid_format", pa.bool_(), nullable=False),
        pa.field("tool_calls", pa.int32(), nullable=False),
        pa.field("generated_tokens", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ],
    version="2",  # 2: sampled mode holds evaluate.pass_k samples per question; valid_format column
)

PREFERENCES_FILE = "preferences.parquet"
PREFERENCES = _schema(  # sibling-subtree preference pairs in TRL's DPO format (components/advantages/preferences.py)
    "preferences",
    [
        pa.field("prompt", pa.string(), nullable=False),  # prompt text + the shared steps down to the branch point
        pa.field("chosen", pa.string(), nullable=False),  # the better sibling + its highest-value path to a leaf
        pa.field("rejected", pa.string(), nullable=False),  # the worse sibling + its lowest-value path to a leaf
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("depth", pa.int32(), nullable=False),  # depth of the compared steps; 1 = first steps
        pa.field("value_gap", pa.float32(), nullable=False),  # V(chosen) − V(rejected) ≥ the margin
        pa.field("chosen_value", pa.float32(), nullable=False),  # V = mean reward of the leaves under the node
        pa.field("rejected_value", pa.float32(), nullable=False),
        pa.field("branch_tree_id", pa.int32(), nullable=True),  # null: the branch point is the prompt
        pa.field("branch_node_id", pa.int32(), nullable=True),
        pa.field("chosen_tree_id", pa.int32(), nullable=False),
        pa.field("chosen_node_id", pa.int32(), nullable=False),
        pa.field("rejected_tree_id", pa.int32(), nullable=False),
        pa.field("rejected_node_id", pa.int32(), nullable=False),
    ],
)

ALL = {
    s.metadata[b"arborl.schema"].decode(): s
    for s in (FACTS, PROMPTS, NODES, REWARDS, ADVANTAGES, EVAL, PREFERENCES)
}


class SchemaError(storage.ArtifactError):
    """A Parquet artifact that does not match the schema this code expects; the message names the file."""


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def write(rows_or_table: list[dict] | pa.Table, schema: pa.Schema, uri: str) -> int:
    """Validate against `schema` and write atomically; returns the row count."""
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else to_table(rows_or_table, schema)
    table = table.cast(schema) if table.schema != schema else table
    table = table.replace_schema_metadata(schema.metadata)
    storage.write_parquet(table, uri)
    return table.num_rows


def read(uri: str, schema: pa.Schema) -> pa.Table:
    """Read a Parquet artifact and check its name, version and columns against `schema`.

    A missing file raises FileNotFoundError; an unreadable one (truncated, not Parquet) `storage.ArtifactError`;
    one of another schema, version or columns `SchemaError` (an ArtifactError). Every message names `uri`."""
    table = storage.read_parquet(uri)
    name = schema.metadata[b"arborl.schema"].decode()
    meta = table.schema.metadata or {}
    got_name = meta.get(b"arborl.schema", b"").decode()
    got_version = meta.get(b"arborl.schema_version", b"").decode()
    version = schema.metadata[b"arborl.schema_version"].decode()
    if got_name != name or got_version != version:
        raise SchemaError(
            f"{uri}: expected a {name!r} table of schema version {version}, "
            f"found {got_name or 'no arborl schema'!r} version {got_version or '?'}"
        )
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{uri}: missing columns {missing}")
    return table.select(schema.names)


def read_prompts(world_uri: str, split: str | None = None) -> list[dict]:
    """Rows of the prepare output's prompts artifact (of one split when given), in file order."""
    table = read(storage.join(world_uri, PROMPTS_FILE), PROMPTS)
    if split is not None:  # filtered in Arrow: a Parquet dataset's splits can be large
        table = table.filter(pc.equal(table["split"], split))
    return table.to_pylist()
