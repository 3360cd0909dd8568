"""components.stages.prepare: the synthetic world's questions as chat messages, or verl / Search-R1 Parquet files
read into prompts.parquet (schema version 2) with the bad rows listed in the manifest; too many bad rows fail the
stage before anything looks complete."""

from __future__ import annotations

import json
import re

import pytest

from arborl.components.artifacts import manifests, schemas, storage
from arborl.components.config import config_from_dict
from arborl.components.envs.protocol import question_prompt
from arborl.components.stages import prepare
from tests.components.data.test_verl_parquet import search_r1_file, search_r1_row, search_r1_schema, write

SMALL_WORLD = {"num_people": 60, "num_train": 12, "num_val": 4, "num_test": 6}


# Parquet prompts bring their own model and retriever (the config check asks for both)
BYO = {"search": {"backend": "http", "url": "http://127.0.0.1:8000"}, "warmstart": {"enabled": False},
       "model": {"path": "some/model"}}


def parquet_cfg(train: list[str], test: list[str], **data):
    return config_from_dict({"data": {"source": "parquet", "train_files": train, "test_files": test, **data},
                             "world": SMALL_WORLD, **BYO})


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """train: 3 good and 6 bad rows; test: 2 good rows."""
    test = write(tmp_path / "data" / "test.parquet", [search_r1_row("nq", f"Question: t{i}?", [f"a{i}"], i)
                                                      for i in range(2)], search_r1_schema())
    return {"train": search_r1_file(tmp_path / "data" / "train.parquet"), "test": test}


def test_parquet_source_writes_prompts_v2_and_lists_bad_rows(tmp_path, files):
    cfg = parquet_cfg([files["train"]], [files["test"]], max_bad_fraction=0.7)
    out = str(tmp_path / "prepare")
    res = prepare.run(cfg, {}, out)
    table = schemas.read(res.outputs["prompts"], schemas.PROMPTS)  # checks name, version 2 and columns
    assert table.schema.metadata[b"arborl.schema_version"] == b"2"
    assert {"messages", "ability", "reward_model"} <= set(table.column_names)
    assert [p["prompt_id"] for p in schemas.read_prompts(out, "test")] == ["test-nq-0", "test-nq-1"]
    train = schemas.read_prompts(out, "train")
    assert [p["prompt_id"] for p in train] == ["train-nq-0", "train-hotpotqa-0", "train-train:8"]
    assert schemas.read(res.outputs["facts"], schemas.FACTS).num_rows == 0
    assert storage.read_json(res.outputs["world"]) == {
        "source": "parquet", "files": {"train": [files["train"]], "val": [], "test": [files["test"]]}}
    manifest = manifests.read_manifest(out)
    metrics = manifest["metrics"]
    assert (metrics["train_prompts"], metrics["val_prompts"], metrics["test_prompts"]) == (3, 0, 2)
    assert metrics["rows"] == 11 and metrics["bad_rows_total"] == 6
    assert metrics["bad_rows"][0] == {"file": files["train"], "row": 2, "reason": "empty prompt"}
    assert [b["row"] for b in metrics["bad_rows"]] == [2, 3, 4, 5, 6, 7]
    assert prepare.run(cfg, {}, out).skipped


def test_the_manifest_lists_at_most_the_cap_of_bad_rows(tmp_path, files, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_LISTED_BAD_ROWS", 2)
    res = prepare.run(parquet_cfg([files["train"]], [files["test"]], max_bad_fraction=1.0), {}, str(tmp_path / "p"))
    assert len(res.metrics["bad_rows"]) == 2 and res.metrics["bad_rows_total"] == 6


def test_too_many_bad_rows_fail_the_stage_naming_file_and_rows(tmp_path, files):
    out = str(tmp_path / "prepare")
    with pytest.raises(ValueError, match=re.escape(f"{files['train']} row 2: empty prompt")) as err:
        prepare.run(parquet_cfg([files["train"]], [files["test"]]), {}, out)
    assert "data.max_bad_fraction=0.01" in str(err.value)
    assert manifests.read_manifest(out) is None and not storage.exists(storage.join(out, schemas.PROMPTS_FILE))


def test_a_missing_file_fails_the_stage_naming_it(tmp_path, files):
    missing = str(tmp_path / "data" / "val.parquet")
    cfg = parquet_cfg([files["train"]], [files["test"]], val_files=[missing], max_bad_fraction=1.0)
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        prepare.run(cfg, {}, str(tmp_path / "prepare"))
    assert manifests.read_manifest(str(tmp_path / "prepare")) is None


def test_a_split_without_usable_rows_is_an_error(tmp_path, files):
    bad = write(tmp_path / "bad.parquet", [search_r1_row("nq", "Question: q?", [], 0)], search_r1_schema())
    with pytest.raises(ValueError, match=r"data.test_files \(.*bad.parquet\) hold no usable rows.*row 0: empty"):
        prepare.run(parquet_cfg([files["train"]], [bad], max_bad_fraction=1.0), {}, str(tmp_path / "prepare"))


def test_synthetic_prompts_are_one_user_message_of_the_template(tmp_path):
    cfg = config_from_dict({"world": SMALL_WORLD, "agent": {"prompt_template": "<question> {question} </question>"}})
    res = prepare.run(cfg, {}, str(tmp_path / "prepare"))
    rows = schemas.read_prompts(res.out)
    assert res.metrics["train_prompts"] == 12 and len(rows) == 22
    for row in rows:
        question = json.loads(row["extra_info"])["question"]
        assert row["prompt"] == question_prompt(question)  # byte-identical to the word-level prompt
        assert json.loads(row["messages"]) == [{"role": "user", "content": row["prompt"]}]
        assert row["ability"] == "fact-reasoning"
        assert json.loads(row["reward_model"]) == {"style": "rule", "ground_truth": {"target": row["ground_truth"]}}

    other = cfg.model_copy(deep=True)
    other.agent.prompt_template = "Question: {question}\n"
    assert prepare.config_hash(other) != prepare.config_hash(cfg)
    res = prepare.run(other, {}, str(tmp_path / "prepare"))
    assert not res.skipped
    assert schemas.read_prompts(res.out, "val")[0]["prompt"].startswith("Question: ")


def test_the_hash_covers_the_data_section():
    cfg = config_from_dict({"world": SMALL_WORLD})
    assert prepare.config_hash(cfg) != prepare.config_hash(config_from_dict({"world": SMALL_WORLD,
                                                                             "data": {"batch_rows": 8}}))
