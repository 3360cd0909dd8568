"""Bring your own data, model, retriever and reward — all at once, through the real flow: verl-format Parquet files
(bad rows included) written here, `arborl serve-retriever` in its own process serving a Search-R1-format corpus, a
byte-level BPE tokenizer with a Qwen2.5-style chat template and a Qwen2-architecture model (no warm start), and a
user reward callable in TRL's signature for one data source beside the built-in one for the other."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from arborl.components.artifacts import manifests, schemas, storage
from arborl.components.config import WorldConfig, load_config
from arborl.components.envs import protocol
from arborl.components.envs.corpus import write_corpus
from arborl.components.envs.world import build_world, make_questions
from tests.models_bpe import bpe_tokenizer, qwen2_model, save_model_dir, teach_search_format

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
TARGETS = pa.struct([("target", pa.list_(pa.string()))])
VERL = pa.schema([
    ("data_source", pa.string()), ("prompt", pa.list_(MESSAGE)), ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", TARGETS)])),
    ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())])),
])
USER_REWARD = "tests.flows.user_rewards:answer_contains_truth"


def _verl_rows(questions: list[dict], split: str) -> list[dict]:
    rows = []
    for i, q in enumerate(questions):
        question = q["prompt"].replace(protocol.QUESTION_OPEN, "").replace(protocol.QUESTION_CLOSE, "").strip()
        rows.append({"data_source": "nq" if i % 2 else "hotpotqa",
                     "prompt": [{"role": "user", "content": protocol.SEARCH_R1_TEMPLATE.format(question=question)}],
                     "ability": "fact-reasoning",
                     "reward_model": {"style": "rule", "ground_truth": {"target": list(q["ground_truth"])}},
                     "extra_info": {"split": split, "index": i}})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def retriever_url(tmp_path):
    """`arborl serve-retriever` over the synthetic world's facts, exported as a Search-R1 corpus."""
    world = build_world(WorldConfig(num_people=60), 0)
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(world.fact_rows(), str(corpus))
    port = _free_port()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "arborl.flows.cli", "serve-retriever", "--corpus", str(corpus),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": path})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            stderr = proc.stderr.read().decode() if proc.poll() is not None else ""
            pytest.fail(f"serve-retriever did not come up: {stderr}")
        yield url, world
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_parquet_data_http_retriever_bpe_chat_model_and_user_reward_end_to_end(tmp_path, retriever_url,
                                                                                 prefect_server):
    from arborl.flows.pipeline import iteration_dir, train_pipeline

    url, world = retriever_url
    wcfg = WorldConfig(num_people=60)
    split_questions = {s: make_questions(world, wcfg, 0, s, n) for s, n in (("train", 24), ("val", 4), ("test", 6))}
    files = {}
    for split, qs in split_questions.items():
        rows = _verl_rows(qs, split)
        if split == "train":  # two rows that cannot be used: an empty prompt and no ground truth
            rows += [{**rows[0], "prompt": [], "extra_info": {"split": split, "index": 100}},
                     {**rows[1], "reward_model": {"style": "rule", "ground_truth": {"target": []}},
                      "extra_info": {"split": split, "index": 101}}]
        path = tmp_path / "data" / f"{split}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=VERL), path)
        files[split] = str(path)

    texts = [f["text"] for f in world.fact_rows()] + [q["prompt"] for qs in split_questions.values() for q in qs]
    tokenizer = bpe_tokenizer([t.replace(protocol.QUESTION_OPEN, "").replace(protocol.QUESTION_CLOSE, "")
                               for t in texts])
    model = qwen2_model(tokenizer)
    teach_rows = [{"prompt": r["prompt"][0]["content"], "messages": json.dumps(r["prompt"]),
                   "ground_truth": r["reward_model"]["ground_truth"]["target"]}
                  for r in _verl_rows(split_questions["train"], "train")]
    teach_search_format(model, tokenizer, teach_rows)
    model_dir = save_model_dir(model, tokenizer, tmp_path / "qwen2-bpe")

    cfg = load_config(ROOT / "configs" / "micro.yaml", [
        f"run.output_root={tmp_path / 'runs'}", "run.name=byo", "run.keep_iterations=1",
        "data.source=parquet", f"data.train_files=[{files['train']}]", f"data.val_files=[{files['val']}]",
        f"data.test_files=[{files['test']}]", "data.max_bad_fraction=0.1",
        "search.backend=http", f"search.url={url}",
        f"model.path={model_dir}", "warmstart.enabled=false", "train.save_dtype=bfloat16",
        "agent.on_invalid=continue", "agent.max_turns=3",
        "agent.max_tokens_per_turn=24", "agent.max_total_tokens=640",
        f"verify.reward={{default: qa_em_format, hotpotqa: '{USER_REWARD}'}}",
        "registry.enabled=false",
    ])
    summary = train_pipeline(cfg.model_dump(mode="json"))
    root = storage.child(cfg.run.output_root, cfg.run.name)

    prepare = manifests.read_manifest(storage.child(root, "prepare"))
    bad = prepare["metrics"]["bad_rows"]
    assert [(Path(b["file"]).name, b["row"]) for b in bad] == [("train.parquet", 24), ("train.parquet", 25)]
    assert prepare["metrics"]["train_prompts"] == 24

    it = iteration_dir(root, 1)
    nodes = schemas.read(storage.join(storage.child(it, "sample"), schemas.NODES_FILE), schemas.NODES).to_pylist()
    searched = [n for n in nodes if n["action"] == "search"]
    assert searched, "the model searched through the served retriever"
    assert any("<information>Doc 1(Title: " in n["text"] for n in searched)  # Search-R1's observation format
    rewards = schemas.read(storage.join(storage.child(it, "verify"), schemas.REWARDS_FILE), schemas.REWARDS)
    assert set(rewards.column("verifier").to_pylist()) == {"qa_em_format", USER_REWARD}
    assert not any(rewards.column("error").to_pylist())
    assert summary["iterations"] == cfg.run.iterations
    assert "test_em" in summary["history"][-1]
    # storage at scale: the last iteration's model in bfloat16, the earlier one pruned (run.keep_iterations=1)
    last = Path(storage.child(iteration_dir(root, cfg.run.iterations), "train"))
    with safe_open(str(last / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert not (Path(storage.child(it, "train")) / "model.safetensors").exists()
