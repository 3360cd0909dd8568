"""`arborl compare`: the default task with Tree-GRPO and with GRPO at equal generation budget, over several
seeds — one `train_pipeline` subflow per method and seed, each with its own run name — then compare.json,
an MLflow run with the EM-vs-generated-tokens plot, and a Prefect markdown table."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow

from arborl.components import storage
from arborl.components.config import Config
from arborl.components.evaluation.compare import METHODS, aggregate, budget_rule, method_config, plot_curves
from arborl.components.tracking import tracking_uri
from arborl.flows.pipeline import train_pipeline


@flow(name="arborl-compare")
def compare_pipeline(config: dict, seeds: int = 3) -> dict:
    """Run every method × seed and return the comparison (also written to <output_root>/<name>-compare/)."""
    cfg = Config.model_validate(config)
    runs: dict[str, list] = {m: [] for m in METHODS}
    for seed in range(seeds):
        first_root = None  # the methods of one seed share its world and warm start
        for method in METHODS:
            run_cfg = method_config(cfg, method, cfg.run.seed + seed)
            if first_root is None:
                first_root = storage.child(run_cfg.run.output_root, run_cfg.run.name)
            else:
                run_cfg.run.warmstart_from = first_root
            runs[method].append((run_cfg.run.seed, train_pipeline(run_cfg.model_dump(mode="json")), run_cfg))
    result = aggregate(runs)
    result["budget_rule"] = budget_rule(cfg)
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
    for method, data in result["methods"].items():
        em = data["final_test_em"]
        for key in ("mean", "ci_low", "ci_high"):
            client.log_metric(run_id, f"{method}/final_test_em_{key}", em[key])
        client.log_metric(run_id, f"{method}/generated_tokens_per_prompt", data["generated_tokens_per_prompt"])
        for point in data["curve"]:
            client.log_metric(run_id, f"{method}/test_em_vs_tokens", point["test_em"],
                              step=int(point["generated_tokens"]))
    fig = plot_curves(result)
    client.log_figure(run_id, fig, "em_vs_generated_tokens.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "compare.json"
        path.write_bytes(storage.read_bytes(result["out"]))
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def rows(result: dict) -> list[list[str]]:
    """Table rows: method, final test EM mean [95% CI], per-seed values, generated tokens per prompt."""
    out = []
    for method, data in result["methods"].items():
        em = data["final_test_em"]
        seeds = ", ".join(f"{p['final_test_em']:.3f}" for p in data["per_seed"])
        out.append([method, f"{em['mean']:.3f} [{em['ci_low']:.3f}, {em['ci_high']:.3f}]", seeds,
                    f"{data['generated_tokens_per_prompt']:.1f}"])
    return out


def _publish(result: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = ["| method | final test EM [95% CI over seeds] | per seed | generated tokens / prompt |",
             "|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows(result)]
    lines += ["", result["budget_rule"]]
    create_markdown_artifact(key="arborl-compare", markdown="\n".join(lines), description="Tree-GRPO vs GRPO")
