"""sample: grow Tree-GRPO trees (or chains) for this iteration's training prompts → nodes.parquet.

Bad input never crashes the stage: an empty prompt, a prompt that leaves no room in the context
(`agent.max_total_tokens` or the model's `max_position_embeddings`) and a prompt whose episodes met a
tool error are recorded with their reason (`bad` in prompt_stats.json, `bad_prompts` in the metrics)
and left out of nodes.parquet, so nothing downstream trains on them. Only when more than
`sampling.max_bad_fraction` of the prompts is bad does the stage fail, naming them.

Sharding: `run(..., shard=(i, n))` samples every n-th prompt from the i-th (0-based) into its own
output directory (`shard_out`); `merge` joins the shards into the usual nodes.parquet. Each tree's
randomness is its own (see `tree.sample_trees`), so n shards give the same trees as one.
"""

from __future__ import annotations

import random
import threading
from functools import partial

from arborl.components.artifacts import manifests, schemas, storage
from arborl.components.config import Config
from arborl.components.sampling.agent import SearchEnv
from arborl.components.sampling.backends import load_backend
from arborl.components.sampling.budget import plan, prompt_counts, summarize
from arborl.components.sampling.mechanism import mechanism_metrics
from arborl.components.sampling.rng import prompt_draw_seed, sampling_seed
from arborl.components.sampling.scheduler import sample_trees
from arborl.components.sampling.tree import Tree, node_rows
from arborl.components.stages.base import device, load_retriever, run_stage
from arborl.components.stages.contract import SampleInputs, StageResult

SECTIONS = ("sampling", "agent", "budget", "search", "model")
# transformers' from_pretrained initialises on a process-global meta device: shards that run as threads
# of one process must not load at the same time
_LOAD_LOCK = threading.Lock()


def iteration_prompts(cfg: Config, world_uri: str, iteration: int) -> list[dict]:
    """The training prompts of one iteration: a seeded draw without replacement from the train split."""
    train = schemas.read_prompts(world_uri, "train")
    rng = random.Random(prompt_draw_seed(cfg.run.seed, iteration))
    return rng.sample(train, min(cfg.sampling.prompts_per_iteration, len(train)))


def shard_out(out: str, index: int, count: int) -> str:
    """Where shard `index` of `count` writes: a sibling of `out`, which the merged output replaces whole."""
    return f"{out.rstrip('/')}-shards/part-{index:05d}-of-{count:05d}"


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' → (i, n) with 0 <= i < n."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r} must look like i/n, e.g. 0/2") from None
    _check_shard((index, count))
    return index, count


def _check_shard(shard: tuple[int, int]) -> None:
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need n >= 1 and 0 <= i < n (shards are numbered from 0)")


def screen(prompt: dict, ids: list[int], context: int) -> str | None:
    """Why a prompt cannot be sampled, or None when it can."""
    if not str(prompt["prompt"]).strip():
        return "empty prompt"
    if len(ids) >= context:
        return f"prompt is {len(ids)} tokens; the context holds {context} (no room to generate)"
    return None


def tool_error(trees: list[Tree]) -> str | None:
    """The first tool error met in a prompt's trees."""
    for tree in trees:
        for node in tree.nodes:
            if node.step.tool_error:
                return f"tool error: {node.step.tool_error}"
    return None


def check_bad_fraction(cfg: Config, stats: dict[str, dict], where: str) -> None:
    bad = sorted((s["position"], pid, s["bad"]) for pid, s in stats.items() if s.get("bad"))
    limit = cfg.sampling.max_bad_fraction
    if stats and len(bad) / len(stats) > limit:
        listed = "; ".join(f"prompt_id {pid!r}: {reason}" for _, pid, reason in bad)
        raise ValueError(
            f"{where}: {len(bad)} of {len(stats)} prompts are bad, more than sampling.max_bad_fraction={limit}: "
            f"{listed}"
        )


def _finish(cfg: Config, out: str, part: str, rows: list[dict], prompt_tokens: dict[str, list[int]],
            stats: dict[str, dict], extra: dict) -> tuple[dict[str, str], dict]:
    """Write nodes, the prompts' token ids and prompt_stats (good prompts only, in iteration order) and return
    (outputs, metrics). `part`: "" for a whole sample output, a shard's name suffix otherwise."""
    position = {pid: s["position"] for pid, s in stats.items()}
    rows = sorted((r for r in rows if not stats[r["prompt_id"]].get("bad")), key=lambda r: position[r["prompt_id"]])
    good = sorted((pid for pid in prompt_tokens if not stats[pid].get("bad")), key=position.__getitem__)
    nodes_uri = storage.join(out, _named(schemas.NODES_FILE, part))
    tokens_uri = storage.join(out, _named(schemas.PROMPT_TOKENS_FILE, part))
    stats_uri = storage.join(out, schemas.PROMPT_STATS_FILE)
    schemas.write(rows, schemas.NODES, nodes_uri)
    schemas.write([{"prompt_id": pid, "token_ids": prompt_tokens[pid]} for pid in good], schemas.PROMPT_TOKENS,
                  tokens_uri)
    stats, metrics = summarize(stats)
    storage.write_json(stats_uri, stats)
    bad = [{"prompt_id": pid, "reason": s["bad"]} for pid, s in sorted(stats.items(), key=lambda kv: kv[1]["position"])
           if s.get("bad")]
    metrics.update(extra)
    metrics.update(mechanism_metrics(rows))
    metrics.update({"nodes": len(rows), "bad_prompts": bad, "bad_prompt_count": len(bad),
                    "bad_prompt_fraction": len(bad) / max(len(stats), 1)})
    return {"nodes": nodes_uri, "prompt_tokens": tokens_uri, "prompt_stats": stats_uri}, metrics


def _named(file: str, part: str) -> str:
    """`nodes.parquet` for a whole output; `nodes-part-00001-of-00004.parquet` for a shard's part."""
    stem, suffix = file.rsplit(".", 1)
    return f"{stem.replace('_', '-')}-{part}.{suffix}" if part else file


def sample_nodes(cfg: Config, inputs: dict[str, str], out: str, iteration: int,
                 shard: tuple[int, int] | None = None) -> tuple[dict[str, str], dict]:
    """Grow the trees of this iteration's prompts (with `shard=(i, n)`, every n-th from the i-th) with the input
    model; write their nodes and the per-prompt stats under `out`."""
    given = SampleInputs.from_uris(inputs)
    with _LOAD_LOCK:  # vllm runs where it is installed: the Dockerfile's `sampler` image
        loaded = load_backend(cfg, given.model, device(cfg))
    backend, tokenizer, model_context = loaded.backend, loaded.tokenizer, loaded.context_window
    env = SearchEnv(load_retriever(given.world, cfg), tokenizer, cfg.model.chat_template)
    index, count = shard or (0, 1)
    chosen = list(enumerate(iteration_prompts(cfg, given.world, iteration)))[index::count]
    context = min(cfg.agent.max_total_tokens, model_context or 1 << 62)

    stats: dict[str, dict] = {}
    prompts = []
    for pos, row in chosen:
        ids = env.prompt_ids(row)
        reason = screen(row, ids, context)
        stats[row["prompt_id"]] = {"position": pos, **({"bad": reason} if reason else {})}
        if reason is None:
            prompts.append((row["prompt_id"], ids))

    sampling = plan(cfg.sampling, cfg.budget)
    trees = sample_trees(backend, env, prompts, sampling, cfg.agent, seed=sampling_seed(cfg.run.seed, iteration),
                         tokens_per_prompt=cfg.budget.tokens_per_prompt, max_rounds=cfg.budget.max_rounds,
                         token_stop=cfg.budget.token_stop)
    by_prompt: dict[str, list[Tree]] = {}
    for tree in trees:
        by_prompt.setdefault(tree.prompt_id, []).append(tree)
    for pid, counts in prompt_counts(trees).items():
        stats[pid].update(counts)
        reason = tool_error(by_prompt[pid])
        if reason:
            stats[pid]["bad"] = reason

    planned = {"plan_trees_per_prompt": sampling.trees_per_prompt,
               "plan_expansions_per_round": sampling.expansions_per_round,
               "plan_expansion_rounds": sampling.expansion_rounds}
    part = "" if shard is None else f"part-{index:05d}-of-{count:05d}"
    outputs, metrics = _finish(cfg, out, part, node_rows(trees, policy_version=iteration - 1), dict(prompts), stats,
                               planned)
    if shard is None:
        check_bad_fraction(cfg, stats, f"sample iteration {iteration}")
    return outputs, metrics


def run(cfg: Config, inputs: dict[str, str], out: str, iteration: int,
        shard: tuple[int, int] | None = None) -> StageResult:
    if shard is not None:
        _check_shard(shard)
    params = {"iteration": iteration} if shard is None else {"iteration": iteration, "shard": list(shard)}
    return run_stage("sample", cfg, inputs, out, SECTIONS, partial(sample_nodes, cfg, inputs, out, iteration, shard),
                     **params)


def merge_shards(cfg: Config, shards: list[str], out: str, iteration: int) -> tuple[dict[str, str], dict]:
    """Join the shards' nodes and prompt stats, in iteration order, into one nodes.parquet under `out`."""
    rows: list[dict] = []
    tokens: dict[str, list[int]] = {}
    stats: dict[str, dict] = {}
    planned: dict = {}
    for uri in shards:
        shard = StageResult.from_manifest(uri, manifests.read_manifest(uri))
        rows += schemas.read(shard.outputs["nodes"], schemas.NODES).to_pylist()
        tokens.update({r["prompt_id"]: r["token_ids"] for r in schemas.read(
            shard.outputs["prompt_tokens"], schemas.PROMPT_TOKENS).to_pylist()})
        stats.update(storage.read_json(shard.outputs["prompt_stats"]))
        planned.update({k: v for k, v in shard.metrics.items() if k.startswith("plan_")})
    outputs, metrics = _finish(cfg, out, "", rows, tokens, stats, {**planned, "shards": len(shards)})
    check_bad_fraction(cfg, stats, f"sample iteration {iteration} ({len(shards)} shards)")
    return outputs, metrics


def merge(cfg: Config, shards: list[str], out: str, iteration: int) -> StageResult:
    """Join finished shard outputs (`run(..., shard=...)` directories) into one sample output at `out`."""
    inputs = {f"shard{i:05d}": uri for i, uri in enumerate(shards)}
    return run_stage("sample", cfg, inputs, out, SECTIONS, partial(merge_shards, cfg, shards, out, iteration),
                     iteration=iteration, merged=len(shards))
