"""GPU check of "bring your own": two RL iterations at real model size, through the stages as the flow runs them.

A Qwen2.5-0.5B-architecture model with random weights (hidden 896, 24 layers, 14 heads / 2 KV heads, the
151,936-entry vocabulary) and a byte-level BPE tokenizer trained here with a Qwen2.5-style chat template;
verl-format Parquet prompts; `arborl serve-retriever`'s API on 127.0.0.1 over the synthetic world's facts; tree
sampling (M=2, N=2, L=1) with the in-process engine, packed training in bfloat16 autocast, evaluation. Prints
one JSON object with seconds and peak GPU memory per stage (also $OUT/gpu_byo.json when OUT is set).

    python scripts/gpu_check_byo.py [--iterations 2] [--prompts 32]
    python scripts/gpu_check_byo.py --device cpu --small --prompts 2   # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from checkout_imports import use_checkout  # noqa: E402

use_checkout()

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from arborl.components.artifacts import storage  # noqa: E402
from arborl.components.config import WorldConfig, config_from_dict  # noqa: E402
from arborl.components.envs import protocol  # noqa: E402
from arborl.components.envs.corpus import write_corpus  # noqa: E402
from arborl.components.envs.retrieval_server import start_in_thread  # noqa: E402
from arborl.components.envs.world import build_world, make_questions  # noqa: E402
from arborl.components.stages import evaluate, label, prepare, sample, train, verify, warmstart  # noqa: E402
from tests.models_bpe import bpe_tokenizer  # noqa: E402

QWEN25_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
              "tie_word_embeddings": True, "rope_theta": 1000000.0}


def verl_files(tmp: Path, world, n_train: int) -> dict[str, str]:
    wcfg = WorldConfig(num_people=600)
    files = {}
    for split, n in (("train", n_train), ("test", 32)):
        rows = []
        for i, q in enumerate(make_questions(world, wcfg, 0, split, n)):
            question = q["prompt"].replace(protocol.QUESTION_OPEN, "").replace(protocol.QUESTION_CLOSE, "").strip()
            rows.append({"data_source": "nq", "prompt": [{"role": "user", "content":
                                                           protocol.SEARCH_R1_TEMPLATE.format(question=question)}],
                         "reward_model": {"style": "rule", "ground_truth": {"target": list(q["ground_truth"])}},
                         "extra_info": {"index": i}})
        files[split] = str(tmp / f"{split}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), files[split])
    return files


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="2 layers of width 64 instead of the real size")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --device cpu --small)")
    dims = {**QWEN25_05B, **({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "num_key_value_heads": 1} if args.small else {})}
    tmp = Path(tempfile.mkdtemp(prefix="arborl-gpu-byo-"))
    world = build_world(WorldConfig(num_people=600), 0)
    files = verl_files(tmp, world, args.prompts * args.iterations)
    write_corpus(world.fact_rows(), str(tmp / "corpus.jsonl"))
    server = start_in_thread(str(tmp / "corpus.jsonl"))

    tokenizer = bpe_tokenizer([f["text"] for f in world.fact_rows()], vocab_size=4000)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**dims, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
    model.to(torch.bfloat16).save_pretrained(tmp / "qwen2.5-0.5b-random")
    tokenizer.save_pretrained(tmp / "qwen2.5-0.5b-random")
    del model

    cfg = config_from_dict({
        "run": {"name": "gpu-byo", "output_root": str(tmp / "runs"), "iterations": args.iterations,
                "device": args.device},
        "data": {"source": "parquet", "train_files": [files["train"]], "test_files": [files["test"]]},
        "search": {"backend": "http", "url": server.url},
        "model": {"path": str(tmp / "qwen2.5-0.5b-random"), "dtype": "bfloat16"},
        "warmstart": {"enabled": False},
        "agent": {"max_turns": 4, "max_tokens_per_turn": 64, "max_total_tokens": 1024, "on_invalid": "continue"},
        "sampling": {"prompts_per_iteration": args.prompts, "trees_per_prompt": 2, "expansions_per_round": 2,
                     "expansion_rounds": 1},
        "train": {"bf16": cuda, "gradient_checkpointing": cuda, "save_dtype": "bfloat16", "lr": 1e-6,
                  "max_tokens_per_microbatch": 16384},
        "evaluate": {"pass_k": [1]},
        "tracking": {"enabled": False}, "registry": {"enabled": False},
    })
    root = storage.child(cfg.run.output_root, cfg.run.name)
    report: dict = {"model": f"Qwen2.5-0.5B architecture{' (small)' if args.small else ''}, random weights",
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "prompts_per_iteration": args.prompts, "stages": []}

    def timed(name: str, fn, *a, **kw):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn(*a, **kw)
        if cuda:
            torch.cuda.synchronize()
        report["stages"].append({"stage": name, "seconds": round(time.perf_counter() - start, 2),
                                 "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                                 **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))
                                    and k in ("nodes", "leaves", "tokens", "generated_tokens", "loss",
                                              "unique_tokens", "duplicated_tokens", "reward_mean")}})
        print(json.dumps(report["stages"][-1]), flush=True)
        return result.out

    world_uri = timed("prepare", prepare.run, cfg, {}, storage.child(root, "prepare"))
    model_uri = timed("warmstart (save the given model)", warmstart.run, cfg, {"world": world_uri},
                      storage.child(root, "warmstart"))
    for it in range(1, args.iterations + 1):
        d = storage.child(root, f"iter_{it:03d}")
        nodes = timed(f"sample-it{it}", sample.run, cfg, {"model": model_uri, "world": world_uri},
                      storage.child(d, "sample"), it)
        rewards = timed(f"verify-it{it}", verify.run, cfg, {"nodes": nodes, "world": world_uri},
                        storage.child(d, "verify"))
        adv = timed(f"label-it{it}", label.run, cfg, {"nodes": nodes, "rewards": rewards, "world": world_uri},
                    storage.child(d, "label"))
        model_uri = timed(f"train-it{it}", train.run, cfg, {"model": model_uri, "nodes": nodes, "advantages": adv,
                                                            "world": world_uri}, storage.child(d, "train"), it)
    timed("evaluate", evaluate.run, cfg, {"model": model_uri, "world": world_uri}, storage.child(root, "eval"))
    server.stop()
    text = json.dumps(report, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_byo.json").write_text(text)


if __name__ == "__main__":
    main()
