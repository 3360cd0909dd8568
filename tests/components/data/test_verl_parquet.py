"""components.data.verl_parquet: verl / Search-R1 Parquet files read unchanged into prompts rows, streamed; bad
rows skipped and named; a missing file or column is an error naming it; local paths and S3."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arborl.components.artifacts import schemas, storage
from arborl.components.data import verl_parquet
from arborl.components.data.verl_parquet import check_bad_rows, read_files
from arborl.components.evaluation.evaluate import question_hops

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
TARGETS_STRUCT = pa.struct([("style", pa.string()),
                            ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))])
INDEX_STRUCT = pa.struct([("split", pa.string()), ("index", pa.int64())])


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def write(path: Path, rows: list[dict], schema: pa.Schema) -> str:
    """A Parquet file of `rows` in verl form (small row groups, so a read spans several)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)
    return str(path)


def search_r1_schema(reward_model: pa.DataType = TARGETS_STRUCT, extra_info: pa.DataType = INDEX_STRUCT
                     ) -> pa.Schema:
    return pa.schema([("data_source", pa.string()), ("prompt", pa.list_(MESSAGE)), ("ability", pa.string()),
                      ("reward_model", reward_model), ("extra_info", extra_info)])


def search_r1_row(source: str, question: str, targets: list[str] | None, index: int | None) -> dict:
    """A row as Search-R1's data scripts write it (the ground truth a struct holding `target`)."""
    return {"data_source": source, "prompt": user(question), "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": targets}},
            "extra_info": None if index is None else {"split": "train", "index": index}}


def search_r1_file(path: Path) -> str:
    """Rows 0, 1 and 8 are good; 2-7 are bad (one of each kind)."""
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Question: who wrote it?"}]
    rows = [
        search_r1_row("nq", "Question: where is paris?", ["France", "french republic"], 0),
        {**search_r1_row("hotpotqa", "", ["Austen"], 0), "prompt": chat},
        {**search_r1_row("nq", "", ["x"], 2), "prompt": []},  # empty prompt
        {**search_r1_row("nq", "", ["x"], 3), "prompt": [{"role": "system", "content": "no question"}]},
        {**search_r1_row("nq", "", ["x"], 4), "prompt": [{"role": "user", "content": None}]},
        search_r1_row("nq", "Question: q5?", [], 5),  # no targets
        search_r1_row("nq", "Question: q6?", None, 6),  # target missing
        search_r1_row("nq", "Question: again?", ["y"], 0),  # nq-0 again
        search_r1_row("triviaqa", "Question: no index?", ["z"], None),
    ]
    return write(path, rows, search_r1_schema())


def test_reads_search_r1_rows_unchanged_and_skips_bad_ones(tmp_path):
    uri = search_r1_file(tmp_path / "train.parquet")
    result = read_files({"train": [uri]}, batch_rows=3)
    assert result.total == 9
    assert [r["prompt_id"] for r in result.rows] == ["train-nq-0", "train-hotpotqa-0", "train-train:8"]
    first, chat, no_index = result.rows
    assert first["prompt"] == "Question: where is paris?"
    assert json.loads(first["messages"]) == user("Question: where is paris?")
    assert first["ground_truth"] == ["France", "french republic"]
    assert json.loads(first["reward_model"]) == {"style": "rule",
                                                 "ground_truth": {"target": ["France", "french republic"]}}
    assert first["ability"] == "fact-reasoning" and first["split"] == "train" and first["data_source"] == "nq"
    assert json.loads(first["extra_info"]) == {"split": "train", "index": 0}
    assert chat["prompt"] == "Question: who wrote it?"  # the last user message
    assert [m["role"] for m in json.loads(chat["messages"])] == ["system", "user", "assistant", "user"]
    assert json.loads(no_index["extra_info"]) == {}
    assert [(b["file"], b["row"]) for b in result.bad] == [(uri, i) for i in range(2, 8)]
    reasons = [b["reason"] for b in result.bad]
    assert reasons[:5] == ["empty prompt", "prompt has no user message", "prompt message 0 has no string role and "
                           "content", "empty ground truth", "reward_model.ground_truth has no target"]
    assert reasons[5] == f"duplicate prompt_id 'train-nq-0' (first at {uri} row 0)"
    # the rows fit the prompts artifact
    schemas.write(result.rows, schemas.PROMPTS, str(tmp_path / "prompts.parquet"))
    assert schemas.read(str(tmp_path / "prompts.parquet"), schemas.PROMPTS).num_rows == 3


def test_the_batch_size_does_not_change_what_is_read(tmp_path):
    uri = search_r1_file(tmp_path / "train.parquet")
    one, many = read_files({"train": [uri]}, batch_rows=1), read_files({"train": [uri]}, batch_rows=4096)
    assert (one.rows, one.bad, one.total) == (many.rows, many.bad, many.total)


def test_other_ground_truth_shapes_and_extra_info_as_json(tmp_path):
    as_string = pa.struct([("style", pa.string()), ("ground_truth", pa.string())])
    as_list = pa.struct([("style", pa.string()), ("ground_truth", pa.list_(pa.string()))])
    target_string = pa.struct([("style", pa.string()), ("ground_truth", pa.struct([("target", pa.string())]))])
    math = write(tmp_path / "gsm8k.parquet", [
        {"data_source": "gsm8k", "prompt": user("2 + 40?"), "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "42"}, "extra_info": json.dumps({"index": 7, "hops": 2})},
        {"data_source": "gsm8k", "prompt": user("bad json"), "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "1"}, "extra_info": "{not json"},
        {"data_source": "gsm8k", "prompt": user("a list"), "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "1"}, "extra_info": "[1, 2]"},
        {"data_source": "gsm8k", "prompt": user("blank"), "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": " "}, "extra_info": ""},
        {"data_source": "gsm8k", "prompt": user("no info"), "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "3"}, "extra_info": ""},
    ], search_r1_schema(as_string, pa.string()))
    lists = write(tmp_path / "lists.parquet", [
        {"data_source": "qa", "prompt": user("who?"), "reward_model": {"style": "rule", "ground_truth": ["a", "b"]}},
        {"data_source": None, "prompt": user("who?"), "reward_model": {"style": "rule", "ground_truth": ["a"]}},
    ], pa.schema([("data_source", pa.string()), ("prompt", pa.list_(MESSAGE)), ("reward_model", as_list)]))
    single = write(tmp_path / "single.parquet", [
        {"data_source": "qa", "prompt": user("what?"), "reward_model": {"style": "rule",
                                                                         "ground_truth": {"target": "only"}}},
    ], pa.schema([("data_source", pa.string()), ("prompt", pa.list_(MESSAGE)), ("reward_model", target_string)]))
    text_prompt = write(tmp_path / "text.parquet", [
        {"data_source": "qa", "prompt": "not chat", "reward_model": {"style": "rule", "ground_truth": "a"}},
    ], pa.schema([("data_source", pa.string()), ("prompt", pa.string()), ("reward_model", as_string)]))

    result = read_files({"test": [math, lists, single, text_prompt]})
    got = {r["prompt_id"]: (r["ground_truth"], r["ability"], json.loads(r["extra_info"])) for r in result.rows}
    assert got == {
        "test-gsm8k-7": (["42"], "math", {"index": 7, "hops": 2}),
        "test-gsm8k:4": (["3"], "math", {}),
        "test-lists:0": (["a", "b"], "", {}),
        "test-single:0": (["only"], "", {}),
    }
    assert json.loads(next(r for r in result.rows if r["prompt_id"] == "test-single:0")["reward_model"]) == {
        "style": "rule", "ground_truth": {"target": "only"}}
    assert [(Path(b["file"]).name, b["row"], b["reason"]) for b in result.bad] == [
        ("gsm8k.parquet", 1, "extra_info is not valid JSON"),
        ("gsm8k.parquet", 2, "extra_info is not a struct or a JSON object (got list)"),
        ("gsm8k.parquet", 3, "empty ground truth"),
        ("lists.parquet", 1, "data_source is not a non-empty string"),
        ("text.parquet", 0, "prompt is not a list of chat messages (got str)"),
    ]
    assert result.counts() == {"test": 4} and result.total == 9


def test_ids_are_unique_per_split_and_files_with_one_name_get_distinct_ids(tmp_path):
    rows = [search_r1_row("nq", "Question: q?", ["a"], None)]
    a = write(tmp_path / "nq" / "train.parquet", rows, search_r1_schema())
    b = write(tmp_path / "hotpotqa" / "train.parquet", rows, search_r1_schema())
    indexed = write(tmp_path / "indexed.parquet", [search_r1_row("nq", "Question: q?", ["a"], 1)], search_r1_schema())
    copy = write(tmp_path / "copy.parquet", [search_r1_row("nq", "Question: q?", ["a"], 1)], search_r1_schema())
    result = read_files({"train": [a, b, indexed, copy], "val": [indexed]})
    assert [r["prompt_id"] for r in result.rows] == ["train-train:0", "train-train.1:0", "train-nq-1", "val-nq-1"]
    assert result.bad == [{"file": copy, "row": 0, "reason": f"duplicate prompt_id 'train-nq-1' (first at {indexed} "
                                                                  "row 0)"}]


def test_a_missing_required_column_names_the_file_and_column(tmp_path):
    uri = write(tmp_path / "noreward.parquet", [{"data_source": "nq", "prompt": user("q")}],
                pa.schema([("data_source", pa.string()), ("prompt", pa.list_(MESSAGE))]))
    with pytest.raises(storage.ArtifactError, match=re.escape(f"{uri}: missing required column reward_model")):
        read_files({"train": [uri]})


def test_a_missing_or_unreadable_file_is_an_error_naming_it(tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match=re.escape(f"data file not found: {missing}")):
        read_files({"train": [missing]})
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(storage.ArtifactError, match=re.escape(f"{junk}: not a Parquet file")):
        read_files({"train": [str(junk)]})


def test_too_many_bad_rows_fail_naming_file_and_rows(tmp_path, caplog):
    import logging

    logging.getLogger("arborl").addHandler(caplog.handler)
    uri = search_r1_file(tmp_path / "train.parquet")
    result = read_files({"train": [uri]})
    check_bad_rows(result, 6 / 9)  # 6 bad of 9: at the limit, left out with one warning line naming them
    logging.getLogger("arborl").removeHandler(caplog.handler)
    (warning,) = {r.getMessage() for r in caplog.records if "unusable" in r.getMessage()}  # one line
    assert warning.startswith("6 of 9 data rows are unusable and left out") and f"{uri} row 2: empty prompt" in warning
    with pytest.raises(ValueError, match="6 of 9 data rows are unusable") as err:
        check_bad_rows(result, 0.5)
    message = str(err.value)
    assert f"{uri} row 2: empty prompt" in message and f"{uri} row 6:" in message
    assert "row 7" not in message and "and 1 more" in message  # the first SHOWN_BAD_ROWS are named
    assert verl_parquet.SHOWN_BAD_ROWS == 5


def test_reads_from_s3(s3_bucket, tmp_path):
    root, client = s3_bucket
    local = search_r1_file(tmp_path / "train.parquet")
    client.put_object(Bucket="arborl-test", Key="data/nq/train.parquet", Body=Path(local).read_bytes())
    uri = storage.join(root, "data/nq/train.parquet")
    result = read_files({"train": [uri]}, batch_rows=2)
    assert [r["prompt_id"] for r in result.rows] == ["train-nq-0", "train-hotpotqa-0", "train-train:8"]
    assert result.bad[0] == {"file": uri, "row": 2, "reason": "empty prompt"}
    with pytest.raises(FileNotFoundError, match="s3://arborl-test/data/missing.parquet"):
        read_files({"test": [storage.join(root, "data/missing.parquet")]})


def test_evaluation_reads_hops_of_parquet_rows_as_zero(tmp_path):
    rows = read_files({"test": [search_r1_file(tmp_path / "test.parquet")]}).rows
    assert [question_hops(r["extra_info"]) for r in rows] == [0, 0, 0]
    assert question_hops(json.dumps({"hops": 2})) == 2 and question_hops(json.dumps({"hops": "two"})) == 0
