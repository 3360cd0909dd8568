"""What the pipeline shows while it runs, beyond per-iteration metrics.

MLflow: `plots/curves.png` (reward, EM, tool calls, budget) and `plots/granularity.png` (sibling sets and
signal magnitude by depth), redrawn after every evaluation; the `granularity.json` table (one row per
iteration and depth in MLflow's table layout `{"columns", "data"}`, rewritten whole);
`trees/iter_NNN.html`, the label stage's tree viewer; the train/val/test prompts as dataset inputs; at the end
`plots/stage_times.png` (where the time went), the headline metrics under `summary/` and, after a promotion,
`plots/registry.png` (the champion's gate metric across the model's versions).
Prefect (keys carry the run's name, `artifact_key`): a progress artifact `<run>-progress` moved after sampling
and after training; a table artifact `<run>-iterations` (one row per iteration so far), created once per flow
run and updated in place; the markdown summary `<run>-summary`; the promotion decision
`<run>-promotion-<model>` and the model's version table `<model>-registry`.

The live records (progress, the iteration table, `granularity.json`) are sent at most every
`tracking.update_every_s` seconds each, and always after an evaluated iteration and the last one: a request
costs tens of milliseconds, a tenth of a small model's iteration.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from arborl.components.artifacts import schemas, storage
from arborl.components.config import Config
from arborl.components.stages.contract import StageResult
from arborl.components.tracking.mlflow_run import Tracker
from arborl.components.tracking.plots import champion_figure, curves_figure, granularity_figure, stage_time_figure
from arborl.components.tracking.store import model_version_url
from arborl.flows.links import artifact_key

log = logging.getLogger("arborl.flows")

SAMPLE_KEYS = ("tool_calls_per_prompt", "trajectories_per_prompt", "chain_equivalents_per_prompt",
               "trajectories_per_chain_equivalent", "generated_tokens")
VERIFY_KEYS = ("reward_mean", "correct_mean")
EVAL_KEYS = ("test_em", "test_em_sampled", "test_tool_calls")
TABLE_COLUMNS = ("iteration", "reward_mean", "correct_mean", "test_em", "test_em_sampled", "tool_calls_per_prompt",
                 "chain_equivalents_per_prompt", "generated_tokens", "preference_pairs", "loss")
SUMMARY_METRICS = ("test_em", "test_em_sampled", "val_em", "val_em_sampled")  # summary/<k> and summary/<k>_gain


class Dashboards:
    def __init__(self, tracker: Tracker, cfg: Config):
        self.tracker, self.cfg = tracker, cfg
        self.run_name, self.iterations = cfg.run.name, cfg.run.iterations
        self.keys = {k: artifact_key(self.run_name, k) for k in ("progress", "iterations", "summary")}
        self.keys["promotion"] = artifact_key(self.run_name, "promotion", cfg.registry.model_name)
        self.keys["registry"] = artifact_key(cfg.registry.model_name, "registry")
        self.rows: dict[int, dict] = {}  # iteration → curve values (0: the warm start's evaluation)
        self.granularity: list[dict] = []  # label stages' granularity rows, with their iteration
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # step → stage → s
        self.progress_id: UUID | None = None
        self.table_id: UUID | None = None
        self._sent: dict[str, float] = {}  # live record → when it was last sent (time.monotonic)

    def _due(self, record: str, final: bool) -> bool:
        """Whether to send the live `record` now: its first time, `final` (the end of an evaluated iteration or
        of the last one), or `tracking.update_every_s` after it was last sent."""
        now = time.monotonic()
        if not final and record in self._sent and now - self._sent[record] < self.cfg.tracking.update_every_s:
            return False
        self._sent[record] = now
        return True

    def _final(self, iteration: int) -> bool:
        return iteration % self.cfg.run.eval_every == 0 or iteration >= self.iterations

    def _row(self, iteration: int) -> dict:
        return self.rows.setdefault(iteration, {"iteration": iteration})

    def timed(self, step: int, stage: str, seconds: float) -> None:
        """Count a stage's seconds at `step` (0: prepare, warm start and its evaluation)."""
        self.seconds[step][stage] += seconds

    def datasets(self, world: str) -> None:
        """The prepare output's prompts as the MLflow run's dataset inputs, one per split (contexts train, val,
        test), with prompts.parquet as their source."""
        if not self.tracker.enabled:
            return
        uri = storage.join(world, schemas.PROMPTS_FILE)
        try:
            frame = schemas.read(uri, schemas.PROMPTS).to_pandas()
            frames = {split: frame[frame["split"] == split].reset_index(drop=True)
                      for split in ("train", "val", "test") if (frame["split"] == split).any()}
            logged = self.tracker.log_datasets(uri, frames)
        except Exception as exc:  # lineage is a dashboard: it never fails the run
            log.warning("prompts of %s not logged as MLflow datasets: %s", uri, exc)
            return
        if logged:
            log.info("MLflow dataset inputs: prompts-%s from %s", ", prompts-".join(logged), uri)

    def evaluated(self, iteration: int, metrics: dict) -> None:
        self._row(iteration).update({k: metrics[k] for k in EVAL_KEYS if k in metrics})

    def progress(self, iteration: int, fraction: float) -> None:
        """Move the progress artifact to (iteration − 1 + fraction) / iterations."""
        if not self.iterations:
            return
        value = 100.0 * min(1.0, (iteration - 1 + fraction) / self.iterations)
        if not self._due("progress", final=fraction >= 1.0 and self._final(iteration)):
            return
        if self.progress_id is None:
            self.progress_id = create_progress_artifact(
                value, key=self.keys["progress"], description=f"RL iterations of run {self.run_name}")
        else:
            update_progress_artifact(self.progress_id, value)

    def labelled(self, iteration: int, label: StageResult) -> None:
        """Collect the label stage's granularity report and send the whole table and the tree viewer to MLflow.

        Both replace earlier uploads, so a resumed run never duplicates rows."""
        outputs = label.outputs
        self._row(iteration)["preference_pairs"] = label.metrics.get("preference_pairs")
        if "trees" in outputs:
            self.tracker.log_text(storage.read_bytes(outputs["trees"]).decode(), f"trees/iter_{iteration:03d}.html")
        if "granularity" not in outputs:  # a label output from before the granularity report existed
            return
        self.granularity += [{"iteration": iteration, **r} for r in storage.read_json(outputs["granularity"])]
        if not self._due("granularity", self._final(iteration)):
            return
        columns = list(self.granularity[0]) if self.granularity else []
        self.tracker.log_dict({"columns": columns, "data": [[r.get(c) for c in columns] for r in self.granularity]},
                              schemas.GRANULARITY_FILE)

    def iteration_finished(self, iteration: int, sample: StageResult, verify: StageResult, train: StageResult
                           ) -> None:
        """Add the iteration's row to the Prefect table artifact: created at the first iteration of this flow
        run, then updated in place (one artifact per flow run, not one version per iteration)."""
        row = self._row(iteration)
        row.update({k: sample.metrics[k] for k in SAMPLE_KEYS if k in sample.metrics})
        row.update({k: verify.metrics[k] for k in VERIFY_KEYS if k in verify.metrics})
        row["loss"] = train.metrics.get("loss")
        table = [{k: _round(self.rows[i].get(k)) for k in TABLE_COLUMNS} for i in sorted(self.rows) if i > 0]
        description = f"run {self.run_name}: iterations 1–{iteration} of {self.iterations}"
        if not self._due("table", self._final(iteration)):
            return
        if self.table_id is None:
            self.table_id = create_table_artifact(table, key=self.keys["iterations"], description=description)
            return
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        with get_client(sync_client=True) as client:
            client.update_artifact(self.table_id, ArtifactUpdate(data=json.dumps(table), description=description))

    def plot(self) -> None:
        """Redraw the curves and granularity figures in MLflow (skipped when tracking is off)."""
        if not self.tracker.enabled:
            return
        self.tracker.log_figure(curves_figure([self.rows[i] for i in sorted(self.rows)]), "plots/curves.png")
        if self.granularity:
            its = sorted({r["iteration"] for r in self.granularity})
            self.tracker.log_figure(granularity_figure(self.granularity, f"iterations {its[0]}–{its[-1]}"),
                                    "plots/granularity.png")

    def summary(self, summary: dict, keys: tuple[str, ...]) -> None:
        """The end of a run: `summary/*` headline metrics and `plots/stage_times.png` in MLflow; the Prefect
        markdown summary (warm start vs final for `keys`, seconds per stage, links to the MLflow run)."""
        final, warm = summary["final"], summary["warmstart"]
        headline = {k: final[k] for k in SUMMARY_METRICS if k in final}
        headline.update({f"{k}_gain": final[k] - warm[k] for k in SUMMARY_METRICS if k in final and k in warm})
        headline["wall_seconds"] = summary["wall_seconds"]
        self.tracker.log_metrics(headline, step=self.iterations, prefix="summary/")
        if self.tracker.enabled and self.seconds:
            self.tracker.log_figure(stage_time_figure(self.seconds, f"run {self.run_name}: seconds per stage"),
                                    "plots/stage_times.png")
        lines = [f"## arborl run {self.run_name}", ""]
        if self.tracker.enabled:
            lines += [f"MLflow run: {_link(self.tracker.run_id, self.tracker.url)} (experiment "
                      f"{self.cfg.tracking.experiment}, tracking {self.tracker.uri})", ""]
        lines += ["| metric | warm start | final |", "|---|---|---|"]
        lines += [f"| {k} | {warm[k]:.3f} | {final[k]:.3f} |" for k in keys]
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in summary["stage_seconds"].items()]
        lines.append(f"| **wall** | {summary['wall_seconds']:.1f} |")
        create_markdown_artifact(key=self.keys["summary"], markdown="\n".join(lines),
                                 description=f"run {self.run_name}: warm start vs final, seconds per stage")

    def promoted(self, version: str, result: dict, markdown: str) -> None:
        """After the gated promotion: the decision (linking the MLflow run and the registered version), the
        model's version table, both as Prefect markdown; the champion's gate metric by version in MLflow."""
        from arborl.flows.report import markdown as report_markdown
        from arborl.flows.report import registry_rows

        name = self.cfg.registry.model_name
        version_url = model_version_url(self.tracker.uri or "", name, version)
        links = [f"Registered version: {_link(f'{name} v{version}', version_url)}",
                 f"MLflow run: {_link(self.tracker.run_id, self.tracker.url)}"]
        decision = result["decision"]["decision"]
        create_markdown_artifact(key=self.keys["promotion"], markdown="\n\n".join([markdown, *links]),
                                 description=f"{name} v{version}: {decision}")
        log.info("promotion of %s v%s: %s (%s)", name, version, decision, result["decision"].get("reason"))
        try:
            rows = registry_rows(self.cfg)
        except Exception as exc:  # a dashboard never fails the run
            log.warning("registry report of %s not published: %s", name, exc)
            return
        create_markdown_artifact(key=self.keys["registry"], markdown=report_markdown(name, rows),
                                 description=f"{name}: registered versions, gate decisions and champions")
        self.tracker.log_figure(champion_figure(rows, f"{name}: gate metric by version"), "plots/registry.png")


def _link(text: str | None, url: str | None) -> str:
    """`[text](url)` for an http(s) address, else `text` and the URI in code."""
    if url and url.startswith(("http://", "https://")):
        return f"[{text}]({url})"
    return f"`{url}`" if url else str(text)


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, 4)
    return x
