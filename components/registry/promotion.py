"""Gated promotion: evaluate `challenger` and the current `champion` (or, for the first model, the run's
warm-start model) on the same questions with the same seed, run the gate, write the decision to the challenger
version's tags (`gate.*`, also who was champion before and after) and its description (one sentence), and move
`champion` only on success. A failed or incomplete evaluation never promotes.

The evaluator is passed in (`Evaluator`: the evaluate stage's `evaluate_model` in the flows and the CLI), so the
registry does not depend on the stages.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from arborl.components.artifacts import schemas, storage
from arborl.components.config import Config
from arborl.components.evaluation.evaluate import question_scores
from arborl.components.registry.gate import (
    CHALLENGER,
    CHAMPION,
    INCOMPLETE,
    REJECT,
    GateDecision,
    gate,
    paired_scores,
)
from arborl.components.registry.store import _alias, _client, _fluent_uri, download_version
from arborl.components.tracking.tags import RUN_ROOT_TAG, WARMSTART_MODEL_TAG, WORLD_TAG

DECISION_FILE = "decision.json"  # the gate's decision, under the run's promote_v<version>/

# (config, model URI, world URI, splits) -> (evaluation rows, metrics): the evaluate stage's `evaluate_model`
Evaluator = Callable[[Config, str, str, tuple[str, ...]], tuple[list[dict], dict]]


@dataclass
class Promotion:
    """What `promote` did: the gate's decision, which versions took part and where the rows went."""

    decision: GateDecision
    model_name: str
    challenger_version: str
    baseline: str  # "champion v<N>" or "warm start"
    champion_before: str | None
    champion_after: str | None
    out: str | None

    def description(self, split: str = "") -> str:
        """The decision in one sentence with its numbers (the registered version's description)."""
        d = self.decision
        if d.decision == INCOMPLETE:
            return f"Not promoted: the gate against the {self.baseline} was incomplete ({d.reason})."
        questions = f"{d.n} {split} questions".replace("  ", " ")
        numbers = (f"{d.metric} {d.challenger:.3f} vs {d.baseline:.3f} for the {self.baseline} on {questions}, "
                   f"paired improvement {d.delta:+.3f} with 95% interval [{d.ci_low:+.3f}, {d.ci_high:+.3f}]")
        if d.promoted:
            return f"Promoted to {CHAMPION}: {numbers}, lower bound above the margin {d.margin:g}."
        why = "no improvement" if d.delta <= 0 else f"lower bound not above the margin {d.margin:g}"
        stays = f"{CHAMPION} stays v{self.champion_after}" if self.champion_after else f"no {CHAMPION} yet"
        return f"Not promoted ({stays}): {numbers}, {why}."

    def markdown(self) -> str:
        d = self.decision
        lines = [
            f"## Promotion of {self.model_name} v{self.challenger_version}: **{d.decision}**", "",
            f"{d.reason}", "",
            "| | value |", "|---|---|",
            f"| baseline | {self.baseline} |",
            f"| gate metric ({d.metric}), challenger | {d.challenger:.4f} |",
            f"| gate metric ({d.metric}), baseline | {d.baseline:.4f} |",
            f"| paired improvement | {d.delta:+.4f} |",
            f"| 95% bootstrap interval | [{d.ci_low:+.4f}, {d.ci_high:+.4f}] |",
            f"| margin | {d.margin} |",
            f"| questions | {d.n} |",
            f"| champion before → after | {self.champion_before or '-'} → {self.champion_after or '-'} |",
        ]
        return "\n".join(lines)


def promote(cfg: Config, evaluate: Evaluator, split: str | None = None) -> Promotion:
    """Gate the `challenger` version against `champion` (or the warm start), both scored by `evaluate`, and move
    `champion` on success."""
    client = _client(cfg)
    name = cfg.registry.model_name
    split = split or cfg.registry.split
    challenger = _alias(client, name, CHALLENGER)
    if challenger is None:
        raise ValueError(f"registered model {name!r} has no {CHALLENGER!r} version: run the pipeline first")
    champion = _alias(client, name, CHAMPION)
    tags = challenger.tags
    challenger_version = str(challenger.version)
    champion_version = str(champion.version) if champion is not None else None
    world, run_root = tags.get(WORLD_TAG), tags.get(RUN_ROOT_TAG)
    if run_root and not storage.contains(cfg.run.output_root, run_root):
        raise ValueError(f"registered model {name!r} v{challenger.version}: its tag arborl.run_root={run_root!r} lies "
                         f"outside run.output_root={cfg.run.output_root!r}; nothing is written there")
    if champion_version == challenger_version:
        decision = GateDecision(REJECT, f"v{challenger_version} is already {CHAMPION}", cfg.registry.gate_metric,
                                cfg.registry.margin, 0)
        return Promotion(decision, name, challenger_version, "itself", champion_version, champion_version, None)

    question_ids: list[str] = []
    results: dict[str, tuple[list[dict] | None, str | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            question_ids = [p["prompt_id"] for p in schemas.read_prompts(world, split)] if world else []
            if not question_ids:
                raise ValueError(f"no {split} questions (world {world!r})")
            with _fluent_uri(cfg):
                sources = {"challenger": download_version(client, name, challenger_version,
                                                          Path(tmp) / "challenger")}
                if champion_version is not None:
                    sources["baseline"] = download_version(client, name, champion_version, Path(tmp) / "champion")
            if champion_version is None and tags.get(WARMSTART_MODEL_TAG):
                sources["baseline"] = tags[WARMSTART_MODEL_TAG]
            elif champion_version is None:
                raise ValueError(f"no {CHAMPION} and no warm-start model recorded on v{challenger_version}")
        except Exception as exc:  # nothing to compare: incomplete
            sources = {}
            results = {"challenger": (None, f"{type(exc).__name__}: {exc}")}
        for role, model_uri in sources.items():
            try:
                rows, _ = evaluate(cfg, str(model_uri), world, (split,))
                results[role] = (rows, None)
            except Exception as exc:
                results[role] = (None, f"{role} evaluation failed: {type(exc).__name__}: {exc}")

    def scores(role: str) -> np.ndarray | None:
        rows = results.get(role, (None, None))[0]
        return None if rows is None else paired_scores(question_scores(rows, cfg.registry.gate_metric, split),
                                                       question_ids)

    decision = gate(scores("challenger"), scores("baseline"), cfg.registry.margin, cfg.registry.gate_metric,
                    expected=len(question_ids), resamples=cfg.evaluate.bootstrap, seed=cfg.run.seed)
    errors = [err for _, err in results.values() if err]
    if errors and decision.decision == INCOMPLETE:
        decision = GateDecision(**{**asdict(decision), "reason": "; ".join(errors)})
    baseline_label = f"{CHAMPION} v{champion_version}" if champion_version is not None else "warm start"

    out = None
    if run_root:
        out = storage.child(run_root, f"promote_v{challenger_version}")
        for role, (rows, _) in results.items():
            if rows is not None:
                schemas.write(rows, schemas.EVAL, storage.join(out, f"{role}_{schemas.EVAL_FILE}"))
        storage.write_json(storage.join(out, DECISION_FILE),
                           {**asdict(decision), "baseline": baseline_label, "split": split})
    champion_after = challenger_version if decision.promoted else champion_version
    result = Promotion(decision, name, challenger_version, baseline_label, champion_version, champion_after, out)
    # who was champion when: before and after this gate, and when it decided (for `arborl report`)
    history = {"gate.champion_before": champion_version or "-", "gate.champion_after": champion_after or "-",
               "gate.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for k, v in {**decision.tags(), "gate.baseline_model": baseline_label, "gate.split": split, **history}.items():
        client.set_model_version_tag(name, challenger_version, k, v)
    client.update_model_version(name, challenger_version, description=result.description(split))
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, challenger_version)
    return result
