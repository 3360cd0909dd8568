"""Evaluate a policy with the real tool loop: greedy and one-sample (temperature) EM/F1 by hop count."""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from components.config import AgentConfig, VerifyConfig
from components.models import prompt_ids
from components.sampling.agent import Episode, SearchEnv, Step, run_episodes
from components.sampling.backend import HFBackend
from components.verification.qa_em import score_response


def response_text(steps: list[Step]) -> str:
    """The agent's whole response (turns and observations) as the verifier reads it."""
    return " ".join(s.action_text + s.obs_text for s in steps)


def evaluate_policy(
    backend: HFBackend,
    env: SearchEnv,
    prompt_rows: list[dict],
    agent: AgentConfig,
    verify: VerifyConfig,
    temperature: float,
    seed: int,
) -> tuple[list[dict], dict[str, float]]:
    """Rows of the `eval` table (one per prompt and mode) and summary metrics.

    Metric names: `<split>_em` (greedy), `<split>_em_sampled`, `<split>_f1[_sampled]`,
    `<split>_em[_sampled]_hop<h>`, `<split>_tool_calls[_sampled]`, `<split>_reward[_sampled]`.
    """
    rows: list[dict] = []
    gen = torch.Generator(device=backend.device).manual_seed(seed)
    for mode in ("greedy", "sampled"):
        episodes = [Episode(prompt_ids(env.tokenizer, r["prompt"]), agent.max_turns) for r in prompt_rows]
        run_episodes(backend, env, episodes, agent, temperature, greedy=(mode == "greedy"), generator=gen)
        for r, ep in zip(prompt_rows, episodes, strict=True):
            score = score_response(response_text(ep.steps), list(r["ground_truth"]), verify)
            rows.append(
                {
                    "prompt_id": r["prompt_id"],
                    "split": r["split"],
                    "data_source": r["data_source"],
                    "hops": int(json.loads(r["extra_info"]).get("hops", 0)),
                    "mode": mode,
                    "sample": 0,
                    "reward": score.reward,
                    "em": float(score.correct),
                    "f1": score.f1,
                    "answer": score.answer,
                    "tool_calls": sum(s.action == "search" for s in ep.steps),
                    "generated_tokens": sum(len(s.action_ids) for s in ep.steps),
                    "text": response_text(ep.steps),
                }
            )
    return rows, summarize(rows)


def summarize(rows: list[dict]) -> dict[str, float]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        suffix = "" if r["mode"] == "greedy" else "_" + r["mode"]
        groups[(r["split"], suffix, None)].append(r)
        groups[(r["split"], suffix, r["hops"])].append(r)
    out: dict[str, float] = {}
    for (split, suffix, hops), rs in sorted(groups.items(), key=str):
        n = len(rs)
        if hops is None:
            out[f"{split}_em{suffix}"] = sum(r["em"] for r in rs) / n
            out[f"{split}_f1{suffix}"] = sum(r["f1"] for r in rs) / n
            out[f"{split}_reward{suffix}"] = sum(r["reward"] for r in rs) / n
            out[f"{split}_tool_calls{suffix}"] = sum(r["tool_calls"] for r in rs) / n
            out[f"{split}_generated_tokens{suffix}"] = sum(r["generated_tokens"] for r in rs) / n
        else:
            out[f"{split}_em{suffix}_hop{hops}"] = sum(r["em"] for r in rs) / n
    return out
