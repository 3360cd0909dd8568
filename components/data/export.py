"""The synthetic world's questions written as a verl / Search-R1 Parquet data snapshot, for tests and demos of
`data.source: parquet` and `data.snapshot_root`.

A snapshot folder holds `train.parquet` (part `part` of `parts` disjoint, contiguous parts of the train questions),
`val.parquet`, `test.parquet` and `corpus.jsonl` (the world's facts for `arborl serve-retriever`). Each row's
prompt is the synthetic question's own chat message, so the model sees the same token ids as with
`data.source: synthetic`; `extra_info` keeps the synthetic fields (hops, subject, path, chain, question) plus
`split` and `index` (the question's position in its split, so the prompt id is `<split>-synthetic_kb-<index>`
instead of the synthetic path's `<split>-<NNNNN>`).
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from arborl.components.artifacts import storage
from arborl.components.config import Config
from arborl.components.envs.corpus import write_corpus
from arborl.components.envs.world import build_world, make_questions

CORPUS_FILE = "corpus.jsonl"
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
VERL_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(MESSAGE)),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()),
                                ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))])),
    ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()), ("hops", pa.int64()),
                              ("subject", pa.string()), ("path", pa.list_(pa.string())),
                              ("chain", pa.list_(pa.string())), ("question", pa.string())])),
])


def part_slice(n: int, parts: int, part: int) -> slice:
    """The `part`-th (from 0) of `parts` contiguous, disjoint slices covering range(n)."""
    if parts < 1 or not 0 <= part < parts:
        raise ValueError(f"--part must be in [0, {parts}) for --parts {parts}, got {part}")
    return slice(n * part // parts, n * (part + 1) // parts)


def verl_rows(questions: list[dict], split: str) -> list[dict]:
    """verl rows of prompts-artifact rows made by `make_questions` (their messages and gold answers unchanged)."""
    rows = []
    for q in questions:
        extra = json.loads(q["extra_info"])
        rows.append({
            "data_source": q["data_source"],
            "prompt": json.loads(q["messages"]),
            "ability": q["ability"],
            "reward_model": {"style": "rule", "ground_truth": {"target": list(q["ground_truth"])}},
            "extra_info": {"split": split, "index": int(q["prompt_id"].rsplit("-", 1)[1]), **extra},
        })
    return rows


def _write_parquet(rows: list[dict], uri: str) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=VERL_SCHEMA), buffer)
    storage.write_bytes(uri, buffer.getvalue())


def export_snapshot(cfg: Config, out: str, parts: int = 1, part: int = 0) -> dict[str, int]:
    """Write the world of `cfg.world` and `run.seed` as a snapshot folder at `out` (see the module docstring);
    returns the rows per file and the corpus documents."""
    train_part = part_slice(cfg.world.num_train, parts, part)
    world = build_world(cfg.world, cfg.run.seed)
    counts = {}
    for split, n in (("train", cfg.world.num_train), ("val", cfg.world.num_val), ("test", cfg.world.num_test)):
        questions = make_questions(world, cfg.world, cfg.run.seed, split, n, cfg.agent.prompt_template)
        if split == "train":
            questions = questions[train_part]
        _write_parquet(verl_rows(questions, split), storage.join(out, f"{split}.parquet"))
        counts[split] = len(questions)
    counts["corpus"] = write_corpus(world.fact_rows(), storage.join(out, CORPUS_FILE))
    return counts
