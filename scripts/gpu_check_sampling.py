"""Check the HF sampling backend on a GPU (falls back to the CPU): logits and greedy tokens against the model's
own forward / `generate` in float32 and bfloat16, and decode tokens/s against `model.generate` sampling at batch
8, 32 and 128. Prints one JSON line.

Needs only torch and transformers (pydantic/pyyaml, when present, size the model from configs/tiny.yaml):
    python scripts/gpu_check_sampling.py [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout_imports import use_checkout  # noqa: E402

use_checkout()

from arborl.components.sampling.engine import FORWARDS, HFBackend  # noqa: E402

DEFAULT_VOCAB = 179  # the default world's word-level vocabulary, used where pydantic (the config) is missing


def default_model() -> tuple[dict, int]:
    """configs/tiny.yaml's model section and the default world's vocabulary size; plain defaults on a machine
    without pydantic/pyyaml (then the world cannot be built)."""
    try:
        from arborl.components.config import load_config
        from arborl.components.envs.protocol import TAGS
        from arborl.components.envs.world import build_world, vocabulary
    except ImportError:
        return {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512}, DEFAULT_VOCAB
    cfg = load_config()
    vocab = 4 + len(TAGS) + len(vocabulary(build_world(cfg.world, cfg.run.seed)))
    return cfg.model.model_dump(), vocab

PAD, EOS = 0, 3  # the word-level tokenizer's order: <pad> <unk> <bos> <eos>


def build(device: str, dtype: torch.dtype, hidden: int, layers: int, heads: int, inter: int, vocab: int, peaked: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=2, eos_token_id=EOS)
    model = LlamaForCausalLM(config)
    if peaked:  # far-from-uniform next-token distributions, so greedy choices are not decided by rounding
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "embed" in name:
                    p.normal_(0.0, 1.0)
                elif p.dim() == 2:
                    p.normal_(0.0, (32 / p.shape[1]) ** 0.5)
    return model.to(device=device, dtype=dtype).eval()


def contexts(n: int, vocab: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(4, vocab, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_generate(model, ctxs: list[list[int]], new_tokens: int, greedy: bool) -> torch.Tensor:
    width = max(len(c) for c in ctxs)
    ids = torch.full((len(ctxs), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(ctxs):
        ids[i, width - len(c):] = torch.tensor(c)
        mask[i, width - len(c):] = 1
    dev = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=not greedy,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD, eos_token_id=None,
                         top_k=None, top_p=None, temperature=1.0)
    return out[:, width:]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def parity(model, backend: HFBackend, vocab: int) -> dict:
    ctxs = contexts(8, vocab)
    dev = next(model.parameters()).device
    logits = backend.next_token_logits(ctxs)
    with torch.no_grad():
        ref = torch.stack([model(input_ids=torch.tensor([c], device=dev)).logits[0, -1].float() for c in ctxs])
    greedy = backend.generate(ctxs, [16] * len(ctxs), set(), greedy=True)
    ref_tokens = [hf_generate(model, [c], 16, greedy=True)[0].tolist() for c in ctxs]
    agree = [next((i for i, (a, b) in enumerate(zip(o.tokens, r, strict=True)) if a != b), 16)
             for o, r in zip(greedy, ref_tokens, strict=True)]
    return {"max_abs_logit_diff": float((logits - ref).abs().max()), "logit_scale": float(ref.abs().max()),
            "greedy_equal": sum(a == 16 for a in agree) / len(agree), "greedy_first_divergence": min(agree)}


def throughput(model, backend: HFBackend, vocab: int, device: str, new_tokens: int, repeats: int) -> dict:
    out = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for b in (8, 32, 128):
        ctxs = contexts(b, vocab, seed=b)
        runs = {"backend": lambda c=ctxs: backend.generate(c, [new_tokens] * len(c), set(), 1.0, False, gen),
                "generate": lambda c=ctxs: hf_generate(model, c, new_tokens, greedy=False)}
        best = {}
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                backend.clear_cache()
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        tps = {k: b * new_tokens / v for k, v in best.items()}
        out[b] = {"backend_tok_s": round(tps["backend"]), "generate_tok_s": round(tps["generate"]),
                  "ratio": round(tps["backend"] / tps["generate"], 3)}
    return out


def trees_on_device(device: str) -> dict:
    """Pipelined tree sampling (M=2, N=2, L=1) on the default world with a random tiny model on `device`:
    structure, and every stored log-prob against a teacher-forced forward on the same device."""
    from arborl.components.config import load_config
    from arborl.components.envs.retriever import FTSRetriever
    from arborl.components.envs.world import build_world, make_questions, vocabulary
    from arborl.components.sampling.agent import SearchEnv
    from arborl.components.sampling.scheduler import sample_trees
    from arborl.components.training.models import build_model, build_tokenizer, prompt_ids

    cfg = load_config()
    world = build_world(cfg.world, 0)
    questions = make_questions(world, cfg.world, 0, "train", 16)
    tokenizer = build_tokenizer(vocabulary(world))
    model = build_model(cfg.model, tokenizer, 0).to(device).eval()
    env = SearchEnv(FTSRetriever([f["text"] for f in world.fact_rows()], top_k=3), tokenizer)
    backend = HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    prompts = [(q["prompt_id"], prompt_ids(tokenizer, q["prompt"])) for q in questions]
    trees = sample_trees(backend, env, prompts, cfg.sampling, cfg.agent, seed=0)
    worst = 0.0
    for t in trees:
        for leaf in t.leaves():
            path = t.path(leaf.node_id)
            ids = t.prompt_ids + [x for n in path for x in n.step.action_ids + n.step.obs_ids]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids], device=device)).logits[0].double(), -1)
            pos = len(t.prompt_ids)
            for n in path:
                for tok, stored in zip(n.step.action_ids, n.step.action_logprobs, strict=True):
                    worst = max(worst, abs(stored - float(logp[pos - 1, tok])))
                    pos += 1
                pos += len(n.step.obs_ids)
    return {"forward": backend.forward, "trees": len(trees), "nodes": sum(len(t.nodes) for t in trees),
            "leaves_per_tree": sorted({len(t.leaves()) for t in trees}), "max_abs_logprob_diff": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big", action="store_true", help="also time a 1024-hidden, 8-layer model")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--all-forwards", action="store_true", help="time the tiny model with every forward")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    shape, vocab = default_model()
    dims = (shape["hidden_size"], shape["num_layers"], shape["num_heads"], shape["intermediate_size"])
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
                    "torch": torch.__version__, "vocab": vocab}
    import transformers

    report["transformers"] = transformers.__version__
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        peaked = build(device, dtype, *dims, vocab, True)
        for forward in FORWARDS:
            try:
                backend = HFBackend(peaked, PAD, -1, forward=forward)
            except ValueError as exc:  # e.g. the fused forward is float32-only
                report[f"parity_{name}_{forward}"] = f"unsupported: {exc}"
                continue
            report[f"parity_{name}_{forward}"] = parity(peaked, backend, vocab)
        tiny = build(device, dtype, *dims, vocab, False)
        for forward in FORWARDS if args.all_forwards else (None,):
            try:
                backend = HFBackend(tiny, PAD, -1, forward=forward)
            except ValueError:
                continue
            report[f"decode_tiny_{name}_{backend.forward}"] = throughput(tiny, backend, vocab, device,
                                                                         args.new_tokens, args.repeats)
        if args.big:
            big = build(device, dtype, 1024, 8, 16, 4096, vocab, False)
            report[f"decode_big_{name}"] = throughput(big, HFBackend(big, PAD, -1), vocab, device, args.new_tokens,
                                                      args.repeats)
    try:
        report["trees"] = trees_on_device(device)
    except ImportError as exc:  # no pydantic/pyyaml here: the world cannot be built
        report["trees"] = f"skipped: {exc}"
    if device == "cuda":
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
