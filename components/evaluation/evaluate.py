"""Evaluate a policy with the real tool loop on fixed questions: greedy EM/F1, and `n` samples per question
at a temperature for pass@k; broken down by data source and hop count, with bootstrap intervals.

Rows (the `eval` table): one per question, mode and sample — mode `greedy` has sample 0, mode `sampled`
samples 0..n−1. `summarize` turns rows (fresh, or read back from eval.parquet) into flat metrics.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict

import numpy as np
import torch

from arborl.components.config import AgentConfig, VerifyConfig
from arborl.components.evaluation.metrics import bootstrap_ci, pass_at_k
from arborl.components.sampling.agent import Episode, SearchEnv, Step, run_episodes
from arborl.components.sampling.generation import GenerationBackend
from arborl.components.verification.calls import sample_from_prompt
from arborl.components.verification.scoring import check_reward_errors, score_samples

# Per-question scores a gate or a comparison can use: a greedy column, or a column averaged over samples.
QUESTION_METRICS = ("em", "f1", "reward", "em_sampled", "f1_sampled", "reward_sampled")


def response_text(steps: list[Step]) -> str:
    """The agent's whole response (turns and observations) as the verifier reads it."""
    return " ".join(s.action_text + s.obs_text for s in steps)


def question_hops(extra_info: str) -> int:
    """The hop count a prompt row's `extra_info` (JSON) records; 0 when it records none (e.g. rows read from
    Parquet files)."""
    info = json.loads(extra_info) if extra_info else {}
    hops = info.get("hops") if isinstance(info, dict) else None
    return hops if isinstance(hops, int) and not isinstance(hops, bool) else 0


def evaluate_policy(
    backend: GenerationBackend,
    env: SearchEnv,
    prompt_rows: list[dict],
    agent: AgentConfig,
    verify: VerifyConfig,
    temperature: float,
    seed: int,
    pass_k: tuple[int, ...] = (1,),
    bootstrap: int = 1000,
    max_tool_error_fraction: float = 0.1,
) -> tuple[list[dict], dict[str, float]]:
    """Rows of the `eval` table and summary metrics (see `summarize`). Samples per question = max(pass_k).

    An evaluation judged on broken tools or rewards would look valid and be wrong: more episodes with a tool error
    (the retriever down, malformed answers) than `max_tool_error_fraction`, or more reward errors than
    `verify.max_error_fraction`, raise (`ToolErrors`, `scoring.RewardErrors`) naming the first one; fewer are
    counted in the metrics `tool_errors` and `reward_errors`."""
    n_samples = max(pass_k)
    rows: list[dict] = []
    tool_errors = reward_errors = 0
    gen = torch.Generator(device=backend.device).manual_seed(seed)
    for mode, repeats in (("greedy", 1), ("sampled", n_samples)):
        jobs = [(r, i) for i in range(repeats) for r in prompt_rows]
        episodes = [Episode(env.prompt_ids(r), agent.max_turns) for r, _ in jobs]
        run_episodes(backend, env, episodes, agent, temperature, greedy=(mode == "greedy"), generator=gen)
        texts = [response_text(ep.steps) for ep in episodes]
        tool_errors += check_tool_errors(jobs, episodes, max_tool_error_fraction, mode)
        scores = score_samples([sample_from_prompt(r, text) for (r, _), text in zip(jobs, texts, strict=True)], verify)
        reward_errors += check_reward_errors(
            [((r["prompt_id"], mode, i), o.verifier, o.error) for (r, i), o in zip(jobs, scores, strict=True)],
            verify.max_error_fraction, f"evaluate ({mode})")
        for (r, sample_idx), ep, text, score in zip(jobs, episodes, texts, scores, strict=True):
            rows.append(
                {
                    "prompt_id": r["prompt_id"],
                    "split": r["split"],
                    "data_source": r["data_source"],
                    "hops": question_hops(r["extra_info"]),
                    "mode": mode,
                    "sample": sample_idx,
                    "reward": score.reward,
                    "em": score.em,
                    "f1": score.f1,
                    "answer": score.answer,
                    "valid_format": score.valid_format,
                    "tool_calls": sum(s.action == "search" for s in ep.steps),
                    "generated_tokens": sum(len(s.action_ids) for s in ep.steps),
                    "text": text,
                }
            )
    return rows, {**summarize(rows, pass_k, bootstrap, seed), "tool_errors": tool_errors,
                  "reward_errors": reward_errors}


class ToolErrors(RuntimeError):
    """More evaluation episodes met a tool error than allowed: their scores would measure the tool, not the model."""


def check_tool_errors(jobs: list[tuple[dict, int]], episodes: list[Episode], max_fraction: float, mode: str) -> int:
    """Count the episodes that met a tool error; raise `ToolErrors` above `max_fraction`, naming the first."""
    failed = [(r["prompt_id"], i, next(s.tool_error for s in ep.steps if s.tool_error))
              for (r, i), ep in zip(jobs, episodes, strict=True) if any(s.tool_error for s in ep.steps)]
    if failed and len(failed) / max(len(episodes), 1) > max_fraction:
        pid, i, error = failed[0]
        raise ToolErrors(f"evaluate ({mode}): {len(failed)} of {len(episodes)} episodes met a tool error, more than "
                         f"sampling.max_bad_fraction={max_fraction}; first, question {pid!r} (sample {i}): {error}")
    return len(failed)


def metric_safe(name: str) -> str:
    """`name` as part of an MLflow metric key, which allows letters, digits, `_ - . : /` and spaces: anything else
    becomes `_` (a data_source such as `nq@2024?v=1` gives `nq_2024_v_1`)."""
    return re.sub(r"[^\w\-.:/ ]", "_", name)


def question_scores(rows: list[dict], metric: str, split: str | None = None) -> dict[str, float]:
    """{prompt_id: score} for one of QUESTION_METRICS: `em` is the greedy EM, `em_sampled` the mean EM
    over that question's samples."""
    if metric not in QUESTION_METRICS:
        raise ValueError(f"unknown per-question metric {metric!r}; choose one of {', '.join(QUESTION_METRICS)}")
    column, mode = (metric[: -len("_sampled")], "sampled") if metric.endswith("_sampled") else (metric, "greedy")
    values: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["mode"] == mode and (split is None or r["split"] == split):
            values[r["prompt_id"]].append(float(r[column]))
    return {pid: sum(v) / len(v) if v else math.nan for pid, v in values.items()}


def _per_question(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Group rows by (split, prompt_id): the question's attributes, its greedy row and its sampled rows."""
    out: dict[tuple[str, str], dict] = {}
    for r in rows:
        q = out.setdefault((r["split"], r["prompt_id"]),
                           {"data_source": r["data_source"], "hops": r["hops"], "greedy": None, "sampled": []})
        if r["mode"] == "greedy":
            q["greedy"] = r
        else:
            q["sampled"].append(r)
    return out


def _question_values(q: dict, pass_k: tuple[int, ...]) -> dict[str, float]:
    g, samples = q["greedy"], q["sampled"]
    v: dict[str, float] = {}
    if g is not None:
        v.update({"em": g["em"], "f1": g["f1"], "reward": g["reward"], "tool_calls": g["tool_calls"],
                  "generated_tokens": g["generated_tokens"], "format_error_rate": float(not g["valid_format"])})
    if samples:
        n = len(samples)
        c = sum(int(s["em"] >= 1.0) for s in samples)
        for col in ("em", "f1", "reward", "tool_calls", "generated_tokens"):
            v[f"{col}_sampled"] = sum(float(s[col]) for s in samples) / n
        v["format_error_rate_sampled"] = sum(float(not s["valid_format"]) for s in samples) / n
        for k in pass_k:
            if k <= n:
                v[f"pass_at_{k}"] = pass_at_k(n, c, k)
    return v


HEADLINE = ("em", "f1", "em_sampled")  # plus every pass_at_k: these get bootstrap intervals


def summarize(rows: list[dict], pass_k: tuple[int, ...] = (1,), bootstrap: int = 1000, seed: int = 0
              ) -> dict[str, float]:
    """Flat metrics `<split>_<name>` averaged over questions (sampled values are first averaged within a
    question): em, f1, reward, tool_calls, generated_tokens (tokens per answer), format_error_rate, each
    also `_sampled`; pass_at_<k>; `_hop<h>` and `_src_<data_source>` breakdowns of em, em_sampled and
    pass@k; `_ci_low` / `_ci_high` (95% bootstrap over questions) for em, f1, em_sampled and pass@k."""
    per_split: dict[str, list[dict]] = defaultdict(list)
    for (split, _), q in sorted(_per_question(rows).items()):
        per_split[split].append({**q, "values": _question_values(q, pass_k)})
    out: dict[str, float] = {}
    for split, qs in per_split.items():
        names = sorted({k for q in qs for k in q["values"]})
        for name in names:
            vals = [q["values"][name] for q in qs if name in q["values"]]
            out[f"{split}_{name}"] = sum(vals) / len(vals)
            if name in HEADLINE or name.startswith("pass_at_"):
                ci = bootstrap_ci(np.array(vals), resamples=bootstrap, seed=seed)
                out[f"{split}_{name}_ci_low"], out[f"{split}_{name}_ci_high"] = ci.low, ci.high
        groups: dict[str, list[dict]] = defaultdict(list)
        for q in qs:
            groups[f"hop{q['hops']}"].append(q)
            groups[f"src_{metric_safe(q['data_source'])}"].append(q)
        for group, members in sorted(groups.items()):
            for name in names:
                if name in ("em", "em_sampled") or name.startswith("pass_at_"):
                    vals = [q["values"][name] for q in members if name in q["values"]]
                    if vals:
                        out[f"{split}_{name}_{group}"] = sum(vals) / len(vals)
    return out
