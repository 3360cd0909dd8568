"""Sampling benchmark: trees vs chains, and the HF backend vs `model.generate`, side by side in one run.

On the default world and model (configs/tiny.yaml), with one backend and one setting:
(a) Tree-GRPO trees (M=2, N=2, L=1: 6 trajectories per prompt) vs 6 independent chains per prompt:
    trajectories per generated token and per second (tree ÷ chain; after an untimed warm-up of both,
    alternating repeats, summed), and per processed (generated + prefilled) token; what the per-token ratio is
    in expectation for this policy's chains under the official draw (`budget.random_expansion_cost`), and an
    upper bound of the per-second ratio from the tokens each side processed (`per_second_ceiling`, with a
    prefilled token's cost relative to a decoded one measured here);
(b) the backend's decode throughput vs plain `model.generate` sampling (temperature 1, no top-k/top-p) on the
    same distinct prompts at batch 8, 32 and 128, `decode_tokens` new tokens each, no stopping (best of the repeats);
    plus the first-step logit difference to a plain forward and whether greedy tokens equal `generate`'s;
(c) peak resident memory of the process (and peak CUDA memory on a GPU).

A model that never stops makes (a) meaningless, so the model is either a trained directory (`model_dir`) or the
default tiny model warm-started here for `warmstart_steps` steps on demonstrations.
"""

from __future__ import annotations

import math
import random
import resource
import time

import torch

from arborl.components.config import Config
from arborl.components.envs.demos import build_demonstrations
from arborl.components.envs.retriever import FTSRetriever
from arborl.components.envs.world import build_world, make_questions, vocabulary
from arborl.components.sampling.agent import SearchEnv
from arborl.components.sampling.budget import budget, planned_chains, random_expansion_cost
from arborl.components.sampling.engine import HFBackend
from arborl.components.sampling.rng import bench_decode_seed, bench_sampling_seed
from arborl.components.sampling.scheduler import sample_trees
from arborl.components.training.models import build_model, build_tokenizer, load_policy, prompt_ids
from arborl.components.training.warmstart import supervised_train, tokenize_demo

TREE = {"trees_per_prompt": 2, "expansions_per_round": 2, "expansion_rounds": 1, "keep_leaves": None}
CHAIN = {"trees_per_prompt": 6, "expansion_rounds": 0, "keep_leaves": None}


def _policy(cfg: Config, world, train: list[dict], retriever: FTSRetriever, model_dir: str | None,
            warmstart_steps: int, device: str):
    if model_dir:
        return load_policy(model_dir, device)
    ws = cfg.warmstart
    episodes = build_demonstrations(world, retriever, train, ws, cfg.run.seed, count=min(ws.num_demos, 2000))
    tokenizer = build_tokenizer(vocabulary(world))
    model = build_model(cfg.model, tokenizer, cfg.run.seed).to(device)
    demos = [tokenize_demo(tokenizer, ep) for ep in episodes]
    supervised_train(model, demos, ws.model_copy(update={"steps": warmstart_steps}), tokenizer.pad_token_id,
                     cfg.run.seed)
    return model, tokenizer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tree_vs_chain(backend: HFBackend, env: SearchEnv, prompts, cfg: Config, repeats: int, device: str) -> dict:
    totals = {mode: {"trajectories": 0, "generated_tokens": 0, "prefilled_tokens": 0, "seconds": 0.0}
              for mode in ("tree", "chain")}
    chains = []
    for shape in (TREE, CHAIN):  # warm-up at full size, untimed: first calls pay one-off costs (memory growth)
        sample_trees(backend, env, prompts, cfg.sampling.model_copy(update=shape), cfg.agent, seed=-1)
    for r in range(repeats):
        for mode, shape in (("tree", TREE), ("chain", CHAIN)):
            sampling = cfg.sampling.model_copy(update=shape)
            _sync(device)
            start = time.perf_counter()
            trees = sample_trees(backend, env, prompts, sampling, cfg.agent, seed=bench_sampling_seed(cfg.run.seed, r))
            _sync(device)
            seconds = time.perf_counter() - start
            _, metrics = budget(trees)
            if mode == "chain":
                chains += trees
            for key in ("trajectories", "generated_tokens", "prefilled_tokens"):
                totals[mode][key] += metrics[key]
            totals[mode]["seconds"] += seconds
    out = {}
    for mode, t in totals.items():
        out[f"{mode}_trajectories"] = t["trajectories"]
        out[f"{mode}_generated_tokens"] = t["generated_tokens"]
        out[f"{mode}_prefilled_tokens"] = t["prefilled_tokens"]
        out[f"{mode}_seconds"] = t["seconds"]
        out[f"{mode}_traj_per_token"] = t["trajectories"] / max(t["generated_tokens"], 1)
        out[f"{mode}_traj_per_second"] = t["trajectories"] / t["seconds"]
    out["tree_vs_chain_traj_per_token"] = out["tree_traj_per_token"] / out["chain_traj_per_token"]
    out["tree_vs_chain_traj_per_second"] = out["tree_traj_per_second"] / out["chain_traj_per_second"]
    # the per-second ratio if a prefilled token cost as much as a generated one and nothing else cost anything
    processed = {m: t["trajectories"] / max(t["generated_tokens"] + t["prefilled_tokens"], 1)
                 for m, t in totals.items()}
    out["tree_vs_chain_traj_per_processed_token"] = processed["tree"] / processed["chain"]
    # what the official draw gives in expectation for this policy's chains (see budget.random_expansion_cost)
    cost = random_expansion_cost(chains)
    tree_cost = planned_chains(cfg.sampling.model_copy(update=TREE), cost)
    out["random_expansion_cost"] = cost
    tree_trajectories = TREE["trees_per_prompt"] * (1 + TREE["expansion_rounds"] * TREE["expansions_per_round"])
    out["tree_vs_chain_traj_per_token_expected"] = tree_trajectories / tree_cost  # chains: 1 trajectory per chain
    return out


def per_second_ceiling(report: dict) -> float:
    """Trees ÷ chains in trajectories per second if time were the tokens processed, a prefilled token costing
    `prefill_vs_decode_token_cost` of a decoded one, and nothing else cost anything (no per-step or per-call
    cost, every batch as efficient as the largest): an upper bound of `tree_vs_chain_traj_per_second`."""
    alpha = report["prefill_vs_decode_token_cost"]
    work = {m: (report[f"{m}_generated_tokens"] + alpha * report[f"{m}_prefilled_tokens"]) / report[f"{m}_trajectories"]
            for m in ("tree", "chain")}
    return work["chain"] / work["tree"]


def _hf_generate(model, contexts: list[list[int]], new_tokens: int, pad_id: int, greedy: bool) -> torch.Tensor:
    """Plain `model.generate` on left-padded contexts; returns the new tokens (batch, new_tokens)."""
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(contexts):
        ids[i, width - len(c):] = torch.tensor(c)
        mask[i, width - len(c):] = 1
    dev = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=not greedy,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                         eos_token_id=None, top_k=None, top_p=None, temperature=1.0)
    return out[:, width:]


def backend_vs_generate(backend: HFBackend, contexts: list[list[int]], batch_sizes: tuple[int, ...],
                        new_tokens: int, repeats: int, device: str) -> dict:
    model, pad_id = backend.model, backend.pad_id
    eos = backend.eos_id
    backend.eos_id = -1  # both sides decode exactly new_tokens tokens
    gen = torch.Generator(device=backend.device).manual_seed(0)
    result: dict = {"backend_tokens_per_s": {}, "generate_tokens_per_s": {}, "backend_vs_generate_tokens_per_s": {}}
    try:
        for b in batch_sizes:
            batch = [contexts[i % len(contexts)] for i in range(b)]
            runs = {
                "backend": lambda batch=batch: backend.generate(batch, [new_tokens] * len(batch), set(), 1.0,
                                                                False, gen),
                "generate": lambda batch=batch: _hf_generate(model, batch, new_tokens, pad_id, greedy=False),
            }
            best = {}
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(repeats):
                for name, fn in runs.items():  # interleaved, so both see the same machine load
                    backend.clear_cache()
                    _sync(device)
                    start = time.perf_counter()
                    fn()
                    _sync(device)
                    best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
            tps = {name: b * new_tokens / s for name, s in best.items()}
            result["backend_tokens_per_s"][b] = tps["backend"]
            result["generate_tokens_per_s"][b] = tps["generate"]
            result["backend_vs_generate_tokens_per_s"][b] = tps["backend"] / tps["generate"]

        # prefill: the largest batch's contexts in one pass, nothing cached (best of the repeats); repeated
        # contexts (when there are fewer than the batch) are fed once, so only distinct ones are counted
        batch = [contexts[i % len(contexts)] for i in range(max(batch_sizes))]
        best = math.inf
        for _ in range(repeats + 1):
            backend.clear_cache()
            _sync(device)
            start = time.perf_counter()
            backend.next_token_logits(batch)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        result["prefill_tokens_per_s"] = sum(len(c) for c in {tuple(c) for c in batch}) / best
        result["prefill_vs_decode_token_cost"] = (result["backend_tokens_per_s"][max(batch_sizes)]
                                                  / result["prefill_tokens_per_s"])

        probe = contexts[: min(8, len(contexts))]
        backend.clear_cache()
        logits = backend.next_token_logits(probe)
        with torch.no_grad():
            ref = torch.stack([model(input_ids=torch.tensor([c], device=backend.device)).logits[0, -1].float()
                               for c in probe])
        result["first_step_max_abs_logit_diff"] = float((logits - ref).abs().max())
        greedy = backend.generate(probe, [16] * len(probe), set(), greedy=True)
        ref_tokens = [_hf_generate(model, [c], 16, pad_id, greedy=True)[0].tolist() for c in probe]
        result["greedy_tokens_equal_generate"] = all(o.tokens == r for o, r in zip(greedy, ref_tokens, strict=True))
    finally:
        backend.eos_id = eos
    return result


def run_benchmark(
    cfg: Config,
    model_dir: str | None = None,
    warmstart_steps: int = 150,
    prompts: int = 32,
    repeats: int = 3,
    batch_sizes: tuple[int, ...] = (8, 32, 128),
    decode_tokens: int = 128,
) -> dict:
    """All numbers of `arborl bench sampling` as one flat dict (the decode comparison keyed by batch size)."""
    device = "cuda" if cfg.run.device == "auto" and torch.cuda.is_available() else cfg.run.device
    device = "cpu" if device == "auto" else device
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    started = time.perf_counter()
    world = build_world(cfg.world, cfg.run.seed)
    train = make_questions(world, cfg.world, cfg.run.seed, "train", cfg.world.num_train)
    retriever = FTSRetriever([f["text"] for f in world.fact_rows()], top_k=cfg.search.topk)
    model, tokenizer = _policy(cfg, world, train, retriever, model_dir, warmstart_steps, device)
    model.eval()
    setup_seconds = time.perf_counter() - started

    backend = HFBackend(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    env = SearchEnv(retriever, tokenizer)
    rows = random.Random(cfg.run.seed).sample(train, min(prompts, len(train)))
    prompt_list = [(r["prompt_id"], prompt_ids(tokenizer, r["prompt"])) for r in rows]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    result: dict = {
        "device": device,
        "threads": torch.get_num_threads(),
        "model": model_dir or f"tiny warm start, {warmstart_steps} steps",
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": len(prompt_list),
        "repeats": repeats,
        "decode_tokens": decode_tokens,
        "forward": backend.forward,
        "cpu_attention_kernel": backend.uses_cpu_kernel,
        "setup_seconds": setup_seconds,
    }
    result.update(tree_vs_chain(backend, env, prompt_list, cfg, repeats, device))
    # distinct contexts up to the largest batch: the backend prefills a repeated context once, `generate` would not
    decode_rows = random.Random(bench_decode_seed(cfg.run.seed)).sample(train, min(max(batch_sizes), len(train)))
    contexts = [list(c) for c in dict.fromkeys(tuple(prompt_ids(tokenizer, r["prompt"])) for r in decode_rows)]
    result["decode_contexts"] = len(contexts)
    result.update(backend_vs_generate(backend, contexts, batch_sizes, decode_tokens, repeats, device))
    result["tree_vs_chain_traj_per_second_ceiling"] = per_second_ceiling(result)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["total_seconds"] = time.perf_counter() - started
    return result
