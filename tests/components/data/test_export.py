"""`arborl export-data`: the synthetic world as verl Parquet snapshots — disjoint train parts, the same questions
and the same prompt token ids as the synthetic path, and a corpus that `arborl serve-retriever` loads."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from arborl.components.config import load_config
from arborl.components.data import verl_parquet
from arborl.components.envs.retrieval_server import load_corpus
from arborl.components.envs.world import build_world, make_questions, vocabulary
from arborl.components.training.models import build_tokenizer, row_prompt_ids
from arborl.flows.cli import app

ROOT = Path(__file__).resolve().parents[3]
MICRO = ROOT / "configs" / "micro.yaml"


def test_export_data_parts_are_disjoint_and_prompts_tokenize_like_the_synthetic_path(tmp_path):
    for part in (0, 1):
        res = CliRunner().invoke(app, ["export-data", "--config", str(MICRO), "--out", str(tmp_path / f"w{part}"),
                                       "--parts", "2", "--part", str(part)])
        assert res.exit_code == 0, res.output
        assert "30 train, 8 val, 12 test" in res.output
    cfg = load_config(MICRO)
    world = build_world(cfg.world, cfg.run.seed)
    synthetic = {s: make_questions(world, cfg.world, cfg.run.seed, s, n, cfg.agent.prompt_template)
                 for s, n in (("train", 60), ("val", 8), ("test", 12))}

    read = {part: verl_parquet.read_files({s: [str(tmp_path / f"w{part}" / f"{s}.parquet")]
                                           for s in ("train", "val", "test")}) for part in (0, 1)}
    assert not read[0].bad and not read[1].bad
    train = [r for part in (0, 1) for r in read[part].rows if r["split"] == "train"]
    # the two parts split the train questions between them, in order, with nothing shared
    assert [r["prompt"] for r in train] == [q["prompt"] for q in synthetic["train"]]
    assert len({r["prompt_id"] for r in train}) == 60
    assert [r["prompt"] for r in read[0].rows if r["split"] == "val"] == [q["prompt"] for q in synthetic["val"]]

    # the micro prompt template's message reaches the model as the same token ids, none unknown
    tokenizer = build_tokenizer(vocabulary(world))
    by_prompt = {q["prompt"]: q for qs in synthetic.values() for q in qs}
    for row in read[0].rows + read[1].rows:
        ids = row_prompt_ids(tokenizer, row)
        assert ids == row_prompt_ids(tokenizer, by_prompt[row["prompt"]])
        assert tokenizer.unk_token_id not in ids
        assert row["ground_truth"] == by_prompt[row["prompt"]]["ground_truth"]
        assert json.loads(row["extra_info"])["hops"] == json.loads(by_prompt[row["prompt"]]["extra_info"])["hops"]

    corpus = load_corpus(str(tmp_path / "w0" / "corpus.jsonl"))
    assert len(corpus.contents) == len(world.fact_rows())


def test_export_data_rejects_a_part_outside_the_parts(tmp_path):
    res = CliRunner().invoke(app, ["export-data", "--config", str(MICRO), "--out", str(tmp_path / "w"),
                                   "--parts", "2", "--part", "2"])
    assert res.exit_code == 2 and "--part must be below --parts (2)" in res.output
    assert not (tmp_path / "w").exists()
