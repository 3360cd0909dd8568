"""components.schemas: versioned Arrow schemas, write/read round trip, clear errors naming the file."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from arborl.components.artifacts import schemas, storage

NODE_ROWS = [
    {
        "prompt_id": "train-00000", "tree_id": 0, "node_id": 0, "parent_id": None, "depth": 1,
        "expansion_round": 0, "token_ids": [5, 6, 7, 8], "loss_mask": [True, True, False, False],
        "logprobs": [-0.5, -1.25, math.nan, math.nan], "text": "<search> a </search> <information> x </information>",
        "action": "search", "is_leaf": False, "finish_reason": None, "policy_version": 0,
    },
    {
        "prompt_id": "train-00000", "tree_id": 0, "node_id": 1, "parent_id": 0, "depth": 2,
        "expansion_round": 1, "token_ids": [9, 10], "loss_mask": [True, True], "logprobs": [-0.125, -2.0],
        "text": "<answer> b </answer>", "action": "answer", "is_leaf": True, "finish_reason": "answer",
        "policy_version": 3,
    },
]


def test_all_schemas_are_registered_with_name_and_version():
    assert set(schemas.ALL) == {"facts", "prompts", "nodes", "rewards", "advantages", "eval", "preferences"}
    for name, schema in schemas.ALL.items():
        assert schema.metadata[b"arborl.schema"].decode() == name
        # eval bumped when pass@k samples came in, prompts when chat messages from Parquet data did
        want = "2" if name in ("eval", "prompts") else schemas.SCHEMA_VERSION
        assert schema.metadata[b"arborl.schema_version"].decode() == want


def test_nodes_round_trip(tmp_path):
    uri = str(tmp_path / "nodes.parquet")
    assert schemas.write(NODE_ROWS, schemas.NODES, uri) == 2
    table = schemas.read(uri, schemas.NODES)
    assert table.schema.equals(schemas.NODES, check_metadata=False)
    got = table.to_pylist()
    for want, row in zip(NODE_ROWS, got, strict=True):
        for key, value in want.items():
            if key == "logprobs":
                assert len(row[key]) == len(value)
                for a, b in zip(row[key], value, strict=True):
                    assert (math.isnan(a) and math.isnan(b)) or a == b
            else:
                assert row[key] == value, key


def test_round_trip_from_a_table_with_castable_types(tmp_path):
    # int64 / float64 columns are cast to the schema's int32 / float32
    table = pa.table({
        "prompt_id": ["p"], "tree_id": [1], "leaf_id": [4], "reward": [0.5], "correct": [False], "f1": [0.25],
        "verifier": ["qa_em_format"], "details": ["{}"], "error": pa.array([None], pa.string()),
    })
    uri = str(tmp_path / "rewards.parquet")
    schemas.write(table, schemas.REWARDS, uri)
    back = schemas.read(uri, schemas.REWARDS)
    assert back.schema.field("tree_id").type == pa.int32()
    assert back.schema.field("reward").type == pa.float32()
    assert back.to_pylist() == table.to_pylist()


def test_reading_with_another_schema_names_the_file(tmp_path):
    uri = str(tmp_path / "nodes.parquet")
    schemas.write(NODE_ROWS, schemas.NODES, uri)
    with pytest.raises(schemas.SchemaError) as err:
        schemas.read(uri, schemas.REWARDS)
    assert uri in str(err.value)
    assert "'rewards'" in str(err.value) and "'nodes'" in str(err.value)


def test_reading_another_version_names_the_file(tmp_path):
    table = schemas.to_table(NODE_ROWS, schemas.NODES)
    table = table.replace_schema_metadata({"arborl.schema": "nodes", "arborl.schema_version": "0"})
    uri = str(tmp_path / "old.parquet")
    storage.write_parquet(table, uri)
    with pytest.raises(schemas.SchemaError) as err:
        schemas.read(uri, schemas.NODES)
    assert uri in str(err.value) and "version 0" in str(err.value)


def test_reading_a_plain_parquet_file_names_the_file(tmp_path):
    uri = str(tmp_path / "plain.parquet")
    storage.write_parquet(pa.table({"x": [1]}), uri)
    with pytest.raises(schemas.SchemaError, match="plain.parquet.*no arborl schema"):
        schemas.read(uri, schemas.FACTS)


def test_missing_column_names_file_and_column(tmp_path):
    full = schemas.to_table(NODE_ROWS, schemas.NODES)
    table = full.drop_columns(["logprobs", "depth"]).replace_schema_metadata(schemas.NODES.metadata)
    uri = str(tmp_path / "cut.parquet")
    storage.write_parquet(table, uri)
    with pytest.raises(schemas.SchemaError) as err:
        schemas.read(uri, schemas.NODES)
    assert uri in str(err.value) and "logprobs" in str(err.value) and "depth" in str(err.value)


def test_read_returns_exactly_the_schema_columns_in_order(tmp_path):
    table = schemas.to_table(NODE_ROWS, schemas.NODES)
    table = table.append_column("extra", pa.array([1, 2])).select(["extra", *reversed(schemas.NODES.names)])
    table = table.replace_schema_metadata(schemas.NODES.metadata)
    uri = str(tmp_path / "more.parquet")
    storage.write_parquet(table, uri)
    assert schemas.read(uri, schemas.NODES).column_names == schemas.NODES.names


def test_missing_required_field_on_write_names_the_column(tmp_path):
    rows = [{"doc_id": 0, "subject": "s", "relation": "r", "object": "o"}]  # no "text"
    uri = str(tmp_path / "facts.parquet")
    with pytest.raises(Exception, match="text"):
        schemas.write(rows, schemas.FACTS, uri)
    assert not storage.exists(uri)


def test_read_of_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        schemas.read(str(tmp_path / "absent.parquet"), schemas.FACTS)


def test_truncated_file_names_it_and_the_reason(tmp_path):
    uri = str(tmp_path / schemas.NODES_FILE)
    schemas.write(NODE_ROWS * 50, schemas.NODES, uri)
    data = storage.read_bytes(uri)
    storage.write_bytes(uri, data[: len(data) - 100])
    with pytest.raises(storage.ArtifactError) as err:
        schemas.read(uri, schemas.NODES)
    assert str(err.value).startswith(f"{uri}: not a Parquet file or truncated (")
    assert "<Buffer>" not in str(err.value)
    storage.write_bytes(uri, b'{"not": "parquet"}')
    with pytest.raises(storage.ArtifactError, match="nodes.parquet: not a Parquet file or truncated"):
        schemas.read(uri, schemas.NODES)


def test_schema_errors_are_artifact_errors():
    assert issubclass(schemas.SchemaError, storage.ArtifactError) and issubclass(schemas.SchemaError, ValueError)
