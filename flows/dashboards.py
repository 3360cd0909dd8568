"""What the pipeline shows while it runs, beyond per-iteration metrics.

MLflow: `plots/curves.png` (reward, EM, tool calls, budget) and `plots/granularity.png` (sibling sets and
signal magnitude by depth), redrawn after every evaluation; the `granularity.json` table (one row per
iteration and depth in MLflow's table layout `{"columns", "data"}`, rewritten whole each iteration);
`trees/iter_NNN.html`, the label stage's tree viewer.
Prefect: a progress artifact `rl-progress` moved after sampling and after training of every iteration,
and a table artifact `iteration-table` (one row per iteration so far) created after each iteration.
"""

from __future__ import annotations

from uuid import UUID

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from arborl.components import schemas, storage
from arborl.components.plots import curves_figure, granularity_figure
from arborl.components.tracking import Tracker

SAMPLE_KEYS = ("tool_calls_per_prompt", "trajectories_per_prompt", "chain_equivalents_per_prompt",
               "trajectories_per_chain_equivalent", "generated_tokens")
VERIFY_KEYS = ("reward_mean", "correct_mean")
EVAL_KEYS = ("test_em", "test_em_sampled", "test_tool_calls")
TABLE_COLUMNS = ("iteration", "reward_mean", "correct_mean", "test_em", "test_em_sampled", "tool_calls_per_prompt",
                 "chain_equivalents_per_prompt", "generated_tokens", "preference_pairs", "loss")


class Dashboards:
    def __init__(self, tracker: Tracker, run_name: str, iterations: int):
        self.tracker, self.run_name, self.iterations = tracker, run_name, iterations
        self.rows: dict[int, dict] = {}  # iteration → curve values (0: the warm start's evaluation)
        self.granularity: list[dict] = []  # label stages' granularity rows, with their iteration
        self.progress_id: UUID | None = None

    def _row(self, iteration: int) -> dict:
        return self.rows.setdefault(iteration, {"iteration": iteration})

    def evaluated(self, iteration: int, metrics: dict) -> None:
        self._row(iteration).update({k: metrics[k] for k in EVAL_KEYS if k in metrics})

    def progress(self, iteration: int, fraction: float) -> None:
        """Move the progress artifact to (iteration − 1 + fraction) / iterations."""
        if not self.iterations:
            return
        value = 100.0 * min(1.0, (iteration - 1 + fraction) / self.iterations)
        if self.progress_id is None:
            self.progress_id = create_progress_artifact(
                value, key="rl-progress", description=f"RL iterations of run {self.run_name}")
        else:
            update_progress_artifact(self.progress_id, value)

    def labelled(self, iteration: int, label: dict) -> None:
        """Collect the label stage's granularity report and send the whole table and the tree viewer to MLflow.

        Both replace earlier uploads, so a resumed run never duplicates rows."""
        outputs = label["outputs"]
        self._row(iteration)["preference_pairs"] = label["metrics"].get("preference_pairs")
        if "trees" in outputs:
            self.tracker.log_text(storage.read_bytes(outputs["trees"]).decode(), f"trees/iter_{iteration:03d}.html")
        if "granularity" not in outputs:  # a label output from before the granularity report existed
            return
        self.granularity += [{"iteration": iteration, **r} for r in storage.read_json(outputs["granularity"])]
        columns = list(self.granularity[0]) if self.granularity else []
        self.tracker.log_dict({"columns": columns, "data": [[r.get(c) for c in columns] for r in self.granularity]},
                              schemas.GRANULARITY_FILE)

    def iteration_finished(self, iteration: int, sample: dict, verify: dict, train: dict) -> None:
        row = self._row(iteration)
        row.update({k: sample["metrics"][k] for k in SAMPLE_KEYS if k in sample["metrics"]})
        row.update({k: verify["metrics"][k] for k in VERIFY_KEYS if k in verify["metrics"]})
        row["loss"] = train["metrics"].get("loss")
        table = [{k: _round(self.rows[i].get(k)) for k in TABLE_COLUMNS} for i in sorted(self.rows) if i > 0]
        create_table_artifact(table, key="iteration-table",
                              description=f"run {self.run_name}: iterations 1–{iteration} of {self.iterations}")

    def plot(self) -> None:
        """Redraw the curves and granularity figures in MLflow (skipped when tracking is off)."""
        if not self.tracker.enabled:
            return
        self.tracker.log_figure(curves_figure([self.rows[i] for i in sorted(self.rows)]), "plots/curves.png")
        if self.granularity:
            its = sorted({r["iteration"] for r in self.granularity})
            self.tracker.log_figure(granularity_figure(self.granularity, f"iterations {its[0]}–{its[-1]}"),
                                    "plots/granularity.png")


def _round(x):
    return round(x, 4) if isinstance(x, float) else x
