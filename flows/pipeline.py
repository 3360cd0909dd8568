"""The training flow: prepare → warm start → evaluate → iterations × (sample → verify → label → train
[→ evaluate]). It only wires stages: tasks pass URIs and small dicts. A crashed run resumes when run
again with the same config — every finished stage is skipped by its manifest."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, task, unmapped
from prefect.task_runners import ProcessPoolTaskRunner

from arborl.components.artifacts import retention, stage_keys, storage
from arborl.components.artifacts.run_lock import RunLock
from arborl.components.config import Config
from arborl.components.orchestration import make_executor
from arborl.components.orchestration.error_policy import is_transient
from arborl.components.registry.gate import PROMOTE
from arborl.components.stages import STAGES
from arborl.components.stages import prepare as prepare_stage
from arborl.components.stages import sample as sample_stage
from arborl.components.stages import warmstart as warmstart_stage
from arborl.components.stages.contract import (
    EvaluateInputs,
    LabelInputs,
    SampleInputs,
    StageResult,
    TrainInputs,
    VerifyInputs,
    WarmstartInputs,
)
from arborl.components.tracking.mlflow_run import Tracker
from arborl.components.tracking.tags import (
    ITERATION_TAG,
    RUN_ROOT_TAG,
    SEARCH_COLLAPSE_TAG,
    WARMSTART_MODEL_TAG,
    WORLD_TAG,
)
from arborl.components.training import warm
from arborl.flows import logs
from arborl.flows.alerts import emit_challenger_rejected
from arborl.flows.dashboards import Dashboards
from arborl.flows.links import flow_run_name, mark_stale_runs, mlflow_run_tags
from arborl.flows.progress import Reporter, get_reporter

RUN_CONFIG_FILE = "config.json"  # the resolved config, at the run's root
SUMMARY_FILE = "summary.json"  # what `train_pipeline` returns, at the run's root
MECHANISM_KEYS = ("tool_calls_per_trajectory", "first_step_answer_frac", "truncated_frac", "pool_cut_frac")
SUMMARY_KEYS = ("test_em", "test_em_sampled", "val_em", "val_em_sampled", "test_f1", "test_tool_calls",
                "test_tool_calls_sampled")


def _retry_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a stage only on a transient failure (orchestration/error_policy.py)."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - the task's own exception, re-raised by Prefect
        return is_transient(exc)
    return False


@task(name="stage", retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_transient)
def run_stage_task(name: str, cfg: Config, inputs: dict[str, str], out: str, params: dict[str, Any]) -> StageResult:
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    label = context.task_run.name if context is not None else name
    reporter = get_reporter()
    logs.stage_started(label, out)
    reporter.stage_started(name, params.get("iteration"))
    extra = {"on_step": reporter.warmstart_step} if name == "warmstart" else {}
    started = time.time()
    if cfg.orchestration.executor == "inprocess":
        result = STAGES[name](cfg, inputs, out, **params, **extra)
    else:  # its own process, container or Job, reading the run's resolved config (components/orchestration)
        result = make_executor(cfg).run(name, run_config_uri(cfg), inputs, out, params)
    logs.stage_finished(label, result, time.time() - started)
    reporter.stage_finished(name, params.get("iteration"), result.seconds, result.skipped)
    return result


def run_config_uri(cfg: Config) -> str:
    """`<output_root>/<run.name>/config.json`: the resolved config the flow writes, read by stages that run in
    their own process (`orchestration.executor`)."""
    return storage.child(storage.child(cfg.run.output_root, cfg.run.name), RUN_CONFIG_FILE)


def _stage(name: str, cfg: Config, inputs: dict[str, str], out: str, *, step: int | None = None,
           **params: Any) -> StageResult:
    """Run stage `name` as a task run named `<name>-it<NNN>` (iteration `params["iteration"]`, else `step`) or
    `<name>` for a one-off stage."""
    label = logs.task_run_label(name, params.get("iteration", step))
    return run_stage_task.with_options(name=name, task_run_name=label)(name, cfg, inputs, out, params)


@task(name="sample-merge", retries=1, retry_delay_seconds=2, retry_condition_fn=_retry_transient)
def merge_shards_task(cfg: Config, shards: list[str], out: str, iteration: int) -> StageResult:
    return sample_stage.merge(cfg, shards, out, iteration)


@flow(name="arborl-sample-shards")
def sample_shards(cfg: Config, inputs: dict[str, str], outs: list[str], params: list[dict]) -> list[StageResult]:
    """The shards of one sample stage, mapped over the subflow's task runner: a process pool, one worker
    process per shard, or the workers of the Dask cluster at `orchestration.dask_address` (GPU jobs in
    production)."""
    futures = run_stage_task.with_options(
        name="sample", task_run_name="sample-it{params[iteration]:03d}-shard{params[shard][0]}",
    ).map("sample", unmapped(cfg), unmapped(inputs), outs, params)
    return [f.result() for f in futures]


def _sample(cfg: Config, inputs: dict[str, str], out: str, iteration: int) -> StageResult:
    """The sample stage; with `sampling.shards` > 1 its shards run at once (Prefect `.map`), then merge."""
    n = cfg.sampling.shards
    if n == 1:
        return _stage("sample", cfg, inputs, out, iteration=iteration)
    outs = [sample_stage.shard_out(out, i, n) for i in range(n)]
    params = [{"iteration": iteration, "shard": (i, n)} for i in range(n)]
    shards = sample_shards.with_options(task_runner=_shard_runner(cfg, n))(cfg, inputs, outs, params)
    merged = merge_shards_task.with_options(task_run_name=f"sample-merge-it{iteration:03d}")(
        cfg, [r.out for r in shards], out, iteration)
    merged.seconds += max(r.seconds for r in shards)  # shards run side by side
    return merged


def _shard_runner(cfg: Config, n: int) -> Any:
    """The sample shards' task runner: the Dask scheduler at `orchestration.dask_address`, else n local processes."""
    if cfg.orchestration.dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=cfg.orchestration.dask_address)
    return ProcessPoolTaskRunner(max_workers=n)


def iteration_dir(root: str, iteration: int) -> str:
    return storage.child(root, f"iter_{iteration:03d}")


def reused_warmstart(cfg: Config, source_root: str) -> tuple[str, str]:
    """(world, model) URIs of another run's finished prepare and warm-start outputs, checked against this
    config's world/model/warmstart settings and seed through their manifests (never re-run there)."""
    world, model = storage.child(source_root, "prepare"), storage.child(source_root, "warmstart")
    warm = warmstart_stage.SECTIONS
    for stage, uri, inputs, sections, config_hash in (
            ("prepare", world, {}, prepare_stage.SECTIONS, prepare_stage.config_hash(cfg)),
            ("warmstart", model, WarmstartInputs(world=world).as_uris(), warm, cfg.section_hash(*warm))):
        if stage_keys.completed(uri, stage=stage, inputs=inputs, config_hash=config_hash) is None:
            raise ValueError(f"run.warmstart_from={source_root!r}: {uri} holds no finished {stage} output made "
                             f"with this config's {'/'.join(sections)} settings and seed")
    return world, model


@dataclass
class RunContext:
    """What the steps of one pipeline run share: its config and root, where metrics and progress go, and the
    seconds each stage took."""

    cfg: Config
    root: str
    tracker: Tracker
    dash: Dashboards
    reporter: Reporter
    stage_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    warm_tool_calls: float | None = None  # the warm start's sampled tool calls per answer (test split)
    search_collapse: int | None = None  # the first iteration whose trajectories searched under half of that

    def watch_search(self, it: int, sample_metrics: dict) -> None:
        """The red flag of a policy that stops searching: tool calls per sampled trajectory below half the warm
        start's. The first time, a warning line and the MLflow tag `arborl.search_collapse`."""
        calls = sample_metrics.get("tool_calls_per_trajectory")
        ref = self.warm_tool_calls
        if self.search_collapse is not None or calls is None or not ref or calls >= 0.5 * ref:
            return
        self.search_collapse = it
        logs.log.warning("iteration %d: %.2f tool calls per sampled trajectory, under half the warm start's %.2f: "
                         "the policy is learning to stop searching", it, calls, ref)
        self.tracker.set_tags({SEARCH_COLLAPSE_TAG: f"iteration {it}: {calls:.2f} tool calls per trajectory, "
                                                    f"warm start {ref:.2f}"})

    def record(self, result: StageResult, step: int, prefix: str) -> StageResult:
        """Count a stage result's seconds and log its metrics at `step` (not again for a stage a resumed
        MLflow run already logged: `Tracker.logged`); returns `result`."""
        self.stage_seconds[result.stage] += result.seconds
        self.dash.timed(step, result.stage, result.seconds)
        if not (result.skipped and self.tracker.resumed and self.tracker.logged(step)):
            self.tracker.log_metrics(result.metrics, step=step, prefix=prefix)
            self.tracker.log_metrics({f"{result.stage}_seconds": result.seconds}, step=step, prefix="time/")
        return result


def world_and_warm_start(ctx: RunContext) -> tuple[str, str]:
    """(world, model) URIs: prepare and warm start, or another run's finished ones (`run.warmstart_from`)."""
    cfg, root = ctx.cfg, ctx.root
    if cfg.run.warmstart_from:
        return reused_warmstart(cfg, cfg.run.warmstart_from)
    world = ctx.record(_stage("prepare", cfg, {}, storage.child(root, "prepare")), 0, "prepare/").out
    model = ctx.record(_stage("warmstart", cfg, WarmstartInputs(world=world).as_uris(),
                              storage.child(root, "warmstart")), 0, "warmstart/").out
    return world, model


def evaluate(ctx: RunContext, iteration: int, model: str, world: str, out: str) -> dict:
    """The evaluate stage on `model`, logged at step `iteration` and shown; returns its metrics."""
    metrics = ctx.record(_stage("evaluate", ctx.cfg, EvaluateInputs(model=model, world=world).as_uris(), out,
                                step=iteration),
                         iteration, "eval/").metrics
    ctx.reporter.evaluated(iteration, metrics)
    ctx.dash.evaluated(iteration, metrics)
    return metrics


def run_iteration(ctx: RunContext, it: int, world: str, model: str, warm_model: str) -> tuple[str, dict, dict | None]:
    """RL iteration `it`: sample → verify → label → train the policy `model` [→ evaluate].

    Returns (the trained model, the iteration's history row, the evaluation metrics or None when this
    iteration is not evaluated)."""
    cfg, dash = ctx.cfg, ctx.dash
    iter_dir = iteration_dir(ctx.root, it)
    sampled = ctx.record(_sample(cfg, SampleInputs(model=model, world=world).as_uris(),
                                 storage.child(iter_dir, "sample"), it), it, "sample/")
    ctx.watch_search(it, sampled.metrics)
    dash.progress(it, 0.5)
    verified = ctx.record(_stage("verify", cfg, VerifyInputs(nodes=sampled.out, world=world).as_uris(),
                                 storage.child(iter_dir, "verify"), step=it), it, "verify/")
    labelled = ctx.record(_stage("label", cfg, LabelInputs(nodes=sampled.out, rewards=verified.out,
                                                           world=world).as_uris(),
                                 storage.child(iter_dir, "label"), step=it), it, "label/")
    dash.labelled(it, labelled)
    train_inputs = TrainInputs(model=model, nodes=sampled.out, advantages=labelled.out, world=world,
                               reference=warm_model if cfg.train.kl_coef > 0 else None)
    trained = ctx.record(_stage("train", cfg, train_inputs.as_uris(), storage.child(iter_dir, "train"),
                                iteration=it), it, "train/")
    model = trained.out
    dash.progress(it, 1.0)
    row = {"iteration": it, "reward_mean": verified.metrics["reward_mean"], "loss": trained.metrics["loss"],
           "trajectories": sampled.metrics["trajectories"], "generated_tokens": sampled.metrics["generated_tokens"],
           **{k: sampled.metrics[k] for k in MECHANISM_KEYS if k in sampled.metrics}}
    evaluation = None
    if it % cfg.run.eval_every == 0 or it == cfg.run.iterations:
        evaluation = evaluate(ctx, it, model, world, storage.child(iter_dir, "eval"))
        row.update({k: evaluation[k] for k in ("test_em", "test_em_sampled")})
    dash.iteration_finished(it, sampled, verified, trained)
    if evaluation is not None:
        dash.plot()
    ctx.reporter.iteration_finished(it, row)
    return model, row, evaluation


def prune_iterations(ctx: RunContext, it: int, warm_model: str) -> None:
    """`run.keep_iterations`: once iteration `it` is complete, delete the weights of the iteration models
    before the last K (not the warm-start or a registered model) and the training state of all but the newest
    (components/artifacts/retention.py). Their manifests stay, marked pruned, so a resumed run skips those stages."""
    keep = ctx.cfg.run.keep_iterations
    if keep is None:
        return
    models = {i: storage.child(iteration_dir(ctx.root, i), "train") for i in range(1, it + 1)}
    retention.prune(models, it, keep, protected=[warm_model, *retention.registered(ctx.root)])


@flow(name="arborl-tree-grpo", flow_run_name=flow_run_name)
def train_pipeline(config: dict, config_file: str | None = None, lineage: dict[str, str] | None = None) -> dict:
    """Run the whole pipeline for one config (a `Config` dumped to a dict) and return the summary.

    `data.snapshot: latest` is resolved here, once, to the snapshot folder's name (components/data/snapshots.py).
    `lineage` (`arborl.parent_version`, `arborl.parent_model_uri`: the registered version the start model came
    from) overrides the defaults of `registry.lineage_tags`; the lineage goes to the MLflow run's tags, the
    registered version's tags and the summary.

    `config_file`, the YAML the config came from, is logged to MLflow beside the resolved config. The run root's
    lock (`<output_root>/<run.name>/_lock.json`, components/artifacts/run_lock.py) is held throughout: a second writer
    of the same root fails at once with `LockHeld`.

    The flow run is named after `run.name`; holding the lock, it marks Crashed an earlier flow run of the same
    run that Prefect still shows Running or Pending (its process was killed). `arborl.*` log records go to the
    flow run's logs (flows/logs.py).
    """
    from arborl.components.data.snapshots import resolve_snapshot
    from arborl.components.registry.store import lineage_tags

    cfg = resolve_snapshot(Config.model_validate(config))
    lineage = {**lineage_tags(cfg), **(lineage or {})}
    root = storage.child(cfg.run.output_root, cfg.run.name)
    in_process = cfg.orchestration.executor == "inprocess"
    with RunLock(root, "arborl run"), logs.route_to_prefect(), warm.kept(in_process):  # one writer per run root
        mark_stale_runs(cfg)
        return _train(cfg, root, config_file, lineage)


def _train(cfg: Config, root: str, config_file: str | None, lineage: dict[str, str] | None = None) -> dict:
    started = time.time()
    lineage = lineage or {}
    storage.makedirs(root)
    storage.write_json(storage.child(root, RUN_CONFIG_FILE), cfg.model_dump(mode="json"))
    tracker = Tracker(cfg, root)
    tracker.set_tags({**mlflow_run_tags(cfg, config_file), **lineage})
    tracker.start_system_metrics()
    ctx = RunContext(cfg, root, tracker, Dashboards(tracker, cfg), get_reporter())
    logs.log.info("run %s under %s: MLflow run %s%s", cfg.run.name, root, tracker.run_id or "(tracking off)",
                  " (resumed)" if tracker.resumed else "")
    try:
        ctx.reporter.run_started(cfg)
        world, model = world_and_warm_start(ctx)
        ctx.dash.datasets(world)
        warm_model = model
        warm_eval = evaluate(ctx, 0, model, world, storage.child(root, "warmstart_eval"))
        ctx.warm_tool_calls = warm_eval.get("test_tool_calls_sampled")
        last_eval, last_eval_iter = warm_eval, 0
        history: list[dict] = []
        for it in range(1, cfg.run.iterations + 1):
            evaluated = it % cfg.run.eval_every == 0 or it == cfg.run.iterations
            with ctx.tracker.batched(it, final=evaluated):  # one MLflow request per tracking.update_every_s
                model, row, evaluation = run_iteration(ctx, it, world, model, warm_model)
            history.append(row)
            prune_iterations(ctx, it, warm_model)
            if evaluation is not None:
                last_eval, last_eval_iter = evaluation, it

        summary = {
            "run_name": cfg.run.name,
            "iterations": cfg.run.iterations,
            "final_iteration_evaluated": last_eval_iter,
            "model": model,
            "warmstart": {k: warm_eval[k] for k in SUMMARY_KEYS},
            "final": {k: last_eval[k] for k in SUMMARY_KEYS},
            "final_by_hops": {k: v for k, v in last_eval.items() if k.startswith("test_") and "_hop" in k},
            "warmstart_by_hops": {k: v for k, v in warm_eval.items() if k.startswith("test_") and "_hop" in k},
            "stage_seconds": {k: round(v, 2) for k, v in ctx.stage_seconds.items()},
            "wall_seconds": round(time.time() - started, 2),
            "mlflow_run_id": tracker.run_id,
            "config_hash": cfg.section_hash(),
            "lineage": lineage,
            "history": history,
            "search_collapse": ctx.search_collapse,
        }
        if cfg.registry.enabled and tracker.enabled:
            retention.protect(root, model)  # before registering: a registered model is never pruned
            tags = {WORLD_TAG: world, RUN_ROOT_TAG: root, WARMSTART_MODEL_TAG: warm_model,
                    ITERATION_TAG: str(last_eval_iter), **lineage}
            summary["registry"] = register_and_promote(cfg, tracker.run_id, model, last_eval, tags, ctx.dash)
        _save_summary(ctx, summary, config_file)
        tracker.finish("FINISHED")
        ctx.reporter.run_finished(summary)
        return summary
    except BaseException:
        tracker.finish("FAILED")
        raise


def _save_summary(ctx: RunContext, summary: dict, config_file: str | None) -> None:
    """summary.json at the run's root; the final metrics, the summary and both configs to MLflow; the
    Prefect summary artifact."""
    cfg, tracker = ctx.cfg, ctx.tracker
    summary_uri = storage.child(ctx.root, SUMMARY_FILE)
    storage.write_json(summary_uri, summary)
    tracker.log_metrics({f"final_{k}": v for k, v in summary["final"].items()}, step=cfg.run.iterations)
    tracker.log_metrics({"wall_seconds": summary["wall_seconds"]}, step=cfg.run.iterations)
    if storage.is_local(summary_uri):
        tracker.log_artifact(storage.filesystem(summary_uri)[1])
        tracker.log_artifact(storage.filesystem(storage.child(ctx.root, RUN_CONFIG_FILE))[1])
    if config_file:
        tracker.log_artifact(config_file, "config_file")
    ctx.dash.summary(summary, SUMMARY_KEYS)


@task(name="register", task_run_name="register")
def register_task(cfg: Config, run_id: str, model: str, metrics: dict, tags: dict[str, str]) -> str:
    from arborl.components.registry.store import register_final_model

    return register_final_model(cfg, run_id, model, metrics, tags)


@task(name="promote", task_run_name="promote")
def promote_task(cfg: Config) -> dict:
    from arborl.components.registry.promotion import promote
    from arborl.components.stages.evaluate import evaluate_model

    result = promote(cfg, evaluate_model)
    decision = {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(result.decision).items()}
    return {**asdict(result), "decision": decision, "markdown": result.markdown()}


def register_and_promote(cfg: Config, run_id: str, model: str, metrics: dict, tags: dict[str, str],
                         dash: Dashboards) -> dict:
    """The flow's last steps: register the final model as `challenger`, then the gated promotion, whose
    decision and the model's version table are published as Prefect markdown artifacts (flows/dashboards.py).
    A challenger that is not promoted emits the `arborl.challenger.rejected` event (flows/alerts.py)."""
    # val and test metrics both go on the version: the gate decides on registry.split (val by default), test is
    # reported only
    reported = {k: v for k, v in metrics.items() if k.startswith(("val_", "test_"))}
    version = register_task(cfg, run_id, model, reported, tags)
    logs.log.info("registered %s v%s (alias challenger) from %s", cfg.registry.model_name, version, model)
    result = promote_task(cfg)
    dash.promoted(version, result, result.pop("markdown"))
    if result["decision"]["decision"] != PROMOTE and result["champion_after"] != version:
        emit_challenger_rejected(cfg.registry.model_name, version, result["decision"])  # for alert automations
    return {"model_name": cfg.registry.model_name, "version": version, **result}
