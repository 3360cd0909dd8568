"""`arborl compare`: Tree-GRPO and GRPO at equal cost, over seeds and a sweep of budgets — per seed one
`train_pipeline` subflow that makes the world and warm start (`<name>-base-s<seed>`), then one per budget and
method — then compare.json, an MLflow run with the sweep's plots, and a Prefect markdown table. The equal-cost rule
(`budget.protocol`) is in components/evaluation/compare.py, the statistics in compare_stats.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow

from arborl.components.artifacts import manifests, schemas, storage
from arborl.components.config import Config
from arborl.components.evaluation.compare import (
    METHODS,
    base_config,
    budget_rule,
    chain_tokens,
    method_config,
    run_name,
    sweep,
    token_budget,
    uses_tokens,
)
from arborl.components.evaluation.compare_plots import plot_budgets, plot_curves
from arborl.components.evaluation.compare_stats import RunRecord, add_interpolations, compare_budget, sweep_table
from arborl.components.evaluation.evaluate import question_scores
from arborl.components.stages.contract import StageResult
from arborl.components.stages.warmstart import gold_chain_unit
from arborl.components.tracking.store import tracking_uri
from arborl.flows.pipeline import iteration_dir, train_pipeline


def _root(cfg: Config) -> str:
    return storage.child(cfg.run.output_root, cfg.run.name)


def _finished(out: str) -> StageResult:
    """The finished stage output at `out`, from its manifest."""
    manifest = manifests.read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{out}: no finished stage output (no manifest)")
    return StageResult.from_manifest(out, manifest)


def _record(cfg: Config, summary: dict) -> RunRecord:
    """Read back what one finished run left: its sample and label manifests and prompt stats per iteration, and
    its final evaluation's greedy test EM per question."""
    root = _root(cfg)
    rec = RunRecord(cfg.run.seed, summary, cfg)
    for it in range(1, summary["iterations"] + 1):
        sample = _finished(storage.child(iteration_dir(root, it), "sample"))
        rec.sample.append(sample.metrics)
        rec.prompt_stats.append(storage.read_json(sample.outputs["prompt_stats"]))
        rec.label.append(_finished(storage.child(iteration_dir(root, it), "label")).metrics)
    last = summary["final_iteration_evaluated"]
    out = storage.child(root, "warmstart_eval") if last == 0 else storage.child(iteration_dir(root, last), "eval")
    rows = schemas.read(_finished(out).outputs["eval"], schemas.EVAL).to_pylist()
    rec.test_em = question_scores(rows, "em", split="test")
    for row in summary["history"]:  # the evaluations after the warm start: the primary metric's points
        if "test_em" in row:
            out = storage.child(iteration_dir(root, row["iteration"]), "eval")
            rows = schemas.read(_finished(out).outputs["eval"], schemas.EVAL).to_pylist()
            rec.sampled_test_em[row["iteration"]] = question_scores(rows, "em_sampled", split="test")
    return rec


@flow(name="arborl-compare")
def compare_pipeline(config: dict, seeds: int = 3, budgets: list[float] | None = None) -> dict:
    """Run every seed × budget × method and return the comparison (also written to <output_root>/<name>-compare/).

    `budgets`: chain equivalents per prompt (None: the config's one budget, see `compare.sweep`)."""
    cfg = Config.model_validate(config)
    points = sweep(cfg, budgets)
    runs: list[dict[str, list[RunRecord]]] = [{m: [] for m in METHODS} for _ in points]
    units: dict[int, float] = {}
    for offset in range(seeds):
        base = base_config(cfg, cfg.run.seed + offset)  # the world and warm start every run of this seed reuses
        train_pipeline(base.model_dump(mode="json"))
        seed = base.run.seed
        if any(uses_tokens(cfg, b) for b in points):  # a chain unit turns budgets into token pools
            if cfg.budget.chain_unit == "gold":
                units[seed] = gold_chain_unit(base, storage.child(_root(base), "prepare"))
            else:
                units[seed] = chain_tokens(_finished(storage.child(_root(base), "warmstart_eval")).metrics)
        for i, chains in enumerate(points):
            tokens = token_budget(cfg, chains, units[seed]) if uses_tokens(cfg, chains) else None
            for method in METHODS:
                name = run_name(cfg, method, seed, chains if budgets else None)
                run_cfg = method_config(cfg, method, seed, tokens, chains, name=name, warmstart_from=_root(base))
                runs[i][method].append(_record(run_cfg, train_pipeline(run_cfg.model_dump(mode="json"))))
    entries = [compare_budget(chains, by_method) for chains, by_method in zip(points, runs, strict=True)]
    add_interpolations(entries, runs)
    result = {"budget_rule": budget_rule(cfg, points, units), "chain_tokens": {str(s): u for s, u in units.items()},
              "budgets": entries, "table": sweep_table(entries)}
    out = storage.child(cfg.run.output_root, f"{cfg.run.name}-compare")
    result["out"] = storage.child(out, "compare.json")
    storage.write_json(result["out"], result)
    result["mlflow_run_id"] = _log_to_mlflow(cfg, result) if cfg.tracking.enabled else None
    storage.write_json(result["out"], result)  # again, now with the comparison's MLflow run id
    _publish(result)
    return result


def _log_to_mlflow(cfg: Config, result: dict) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)  # created by the runs above
    run_id = client.create_run(exp.experiment_id, run_name=f"{cfg.run.name}-compare").info.run_id
    for entry, row in zip(result["budgets"], result["table"], strict=True):
        prefix = "" if entry["chains"] is None else f"b{entry['chains']:g}/"
        for method, data in entry["methods"].items():
            em = data["final_test_em"]
            for key in ("mean", "ci_low", "ci_high"):
                client.log_metric(run_id, f"{prefix}{method}/final_test_em_{key}", em[key])
                if data.get("primary"):
                    client.log_metric(run_id, f"{prefix}{method}/primary_{key}", data["primary"][key])
            for key, value in data["spend"].items():
                client.log_metric(run_id, f"{prefix}{method}/{key}", value)
            for key in ("zero_spread_prompt_frac", "zero_spread_tree_frac", "informative_set_frac",
                        "nonzero_adv_token_frac"):
                client.log_metric(run_id, f"{prefix}{method}/{key}", data["signal"]["overall"][key])
                for point in data["signal"]["per_iteration"]:
                    client.log_metric(run_id, f"{prefix}{method}/{key}_by_iteration", point[key],
                                      step=point["iteration"])
            for point in data["curve"]:
                client.log_metric(run_id, f"{prefix}{method}/test_em_vs_tokens", point["test_em"],
                                  step=int(point["generated_tokens"]))
            # the sweep's x axis: what the method realized, in generated tokens per prompt
            realized = int(round(data["spend"]["generated_tokens_per_prompt"]))
            client.log_metric(run_id, f"{method}/test_em_vs_realized_tokens", em["mean"], step=realized)
        for key in ("difference", "ci_low", "ci_high", "primary_difference", "primary_ci_low", "primary_ci_high"):
            if row.get(key) is not None:
                client.log_metric(run_id, f"{prefix}{key}", row[key])
        client.log_metric(run_id, f"{prefix}token_mismatch", row["token_mismatch"])
    client.log_figure(run_id, plot_curves(result["budgets"]), "em_vs_generated_tokens.png")
    client.log_figure(run_id, plot_budgets(result["table"]), "em_vs_realized_tokens.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "compare.json"
        path.write_bytes(storage.read_bytes(result["out"]))
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def _budget(row: dict) -> str:
    if row["chains"] is None:
        return f"{row['tokens_per_prompt']:.0f} tokens"
    if row["tokens_per_prompt"]:
        return f"{row['chains']:g} chains ({row['tokens_per_prompt']:.0f} tokens)"
    return f"{row['chains']:g} chains"


def _interval(row: dict, key: str, low: str, high: str) -> str:
    if row.get(key) is None:
        return "—"
    return f"{row[key]:+.3f} [{row[low]:+.3f}, {row[high]:+.3f}]"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def sweep_rows(result: dict) -> list[list[str]]:
    """Sweep table rows: budget; each method's primary metric and their paired difference; each method's final
    greedy EM and their paired difference; Tree-GRPO interpolated at GRPO's realized tokens (final greedy EM);
    realized generated tokens, tool calls and trajectories per prompt of each."""
    return [[_budget(r), f"{_num(r.get('grpo_primary'))} / {_num(r.get('tree_grpo_primary'))}",
             _interval(r, "primary_difference", "primary_ci_low", "primary_ci_high"),
             f"{r['grpo_em']:.3f} / {r['tree_grpo_em']:.3f}",
             _interval(r, "difference", "ci_low", "ci_high"),
             _interval(r, "interpolated_final_estimate", "interpolated_final_ci_low", "interpolated_final_ci_high"),
             f"{r['grpo_generated_tokens']:.1f} / {r['tree_grpo_generated_tokens']:.1f} ({r['token_mismatch']:+.1%})",
             f"{r['grpo_tool_calls']:.2f} / {r['tree_grpo_tool_calls']:.2f}",
             f"{r['grpo_trajectories']:.2f} / {r['tree_grpo_trajectories']:.2f}"]
            for r in result["table"]]


SWEEP_COLUMNS = ("budget / prompt", "primary, GRPO / Tree", "Tree − GRPO primary [paired 95% CI]",
                 "final greedy EM, GRPO / Tree", "Tree − GRPO final [paired 95% CI]",
                 "Tree at GRPO's tokens − GRPO, final", "generated tokens / prompt, GRPO / Tree",
                 "tool calls / prompt", "trajectories / prompt")


def rows(entry: dict) -> list[list[str]]:
    """Per-method rows of one budget: final test EM mean [95% CI over seeds], per-seed values, generated tokens per
    prompt, and the signal: zero-spread prompt / tree groups, informative sibling sets, non-zero-advantage tokens."""
    out = []
    for method, data in entry["methods"].items():
        em, sig = data["final_test_em"], data["signal"]["overall"]
        seeds = ", ".join(f"{p['final_test_em']:.3f}" for p in data["per_seed"])
        out.append([method, f"{em['mean']:.3f} [{em['ci_low']:.3f}, {em['ci_high']:.3f}]", seeds,
                    f"{data['spend']['generated_tokens_per_prompt']:.1f}",
                    f"{sig['zero_spread_prompt_frac']:.2f} / {sig['zero_spread_tree_frac']:.2f}",
                    f"{sig['informative_set_frac']:.2f}", f"{sig['nonzero_adv_token_frac']:.2f}"])
    return out


METHOD_COLUMNS = ("method", "final test EM [95% CI over seeds]", "per seed", "generated tokens / prompt",
                  "zero-spread prompts / trees", "informative sibling sets", "tokens with advantage ≠ 0")


def markdown(header: tuple[str, ...], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def _publish(result: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = ["## Tree-GRPO vs GRPO at equal cost", ""]
    lines += markdown(SWEEP_COLUMNS, sweep_rows(result))
    for entry, row in zip(result["budgets"], result["table"], strict=True):
        lines += ["", f"### {_budget(row)}", ""] + markdown(METHOD_COLUMNS, rows(entry))
    lines += ["", result["budget_rule"]]
    create_markdown_artifact(key="arborl-compare", markdown="\n".join(lines), description="Tree-GRPO vs GRPO")
