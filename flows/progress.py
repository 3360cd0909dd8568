"""Console progress for a pipeline run: a no-op reporter by default, a Rich one for the CLI.

The per-stage lines (started, finished or skipped, seconds, key metrics) are log records of `arborl.flows`
(flows/logs.py), shown on the same console by the CLI and sent to the Prefect run's logs; the reporter draws
the progress bars and the final tables."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class Reporter:
    def run_started(self, cfg) -> None: ...
    def stage_started(self, stage: str, iteration: int | None) -> None: ...
    def stage_finished(self, stage: str, iteration: int | None, seconds: float, skipped: bool) -> None: ...
    def warmstart_step(self, step: int, total: int, loss: float) -> None: ...
    def evaluated(self, iteration: int, metrics: dict) -> None: ...
    def iteration_finished(self, iteration: int, row: dict) -> None: ...
    def run_finished(self, summary: dict) -> None: ...


_current: Reporter = Reporter()


def get_reporter() -> Reporter:
    return _current


def set_reporter(reporter: Reporter) -> None:
    global _current
    _current = reporter


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=self.console,
        )
        self.iter_task = self.warm_task = None
        self.last_em = ""

    def run_started(self, cfg) -> None:
        self.progress.start()
        self.warm_task = self.progress.add_task("warm start", total=cfg.warmstart.steps, info="")
        self.iter_task = self.progress.add_task("RL iterations", total=cfg.run.iterations, info="")

    def stage_finished(self, stage, iteration, seconds, skipped) -> None:
        if stage == "warmstart":
            self.progress.update(self.warm_task, completed=self.progress.tasks[self.warm_task].total)

    def warmstart_step(self, step, total, loss) -> None:
        self.progress.update(self.warm_task, completed=step, info=f"loss {loss:.3f}")

    def evaluated(self, iteration, metrics) -> None:
        self.last_em = f", test EM {metrics['test_em']:.3f} (it{iteration})"
        self.progress.update(self.iter_task, info=self.last_em.lstrip(", "))

    def iteration_finished(self, iteration, row) -> None:
        self.progress.update(self.iter_task, completed=iteration, info=f"reward {row['reward_mean']:.3f}{self.last_em}")

    def run_finished(self, summary) -> None:
        self.progress.stop()
        table = Table(title=f"arborl run {summary['run_name']}: warm start vs final (held-out test set)")
        table.add_column("metric")
        table.add_column("warm start", justify="right")
        table.add_column("final", justify="right")
        for k, v in summary["final"].items():
            table.add_row(k, f"{summary['warmstart'][k]:.3f}", f"{v:.3f}")
        self.console.print(table)
        times = Table(title="time per stage")
        times.add_column("stage")
        times.add_column("seconds", justify="right")
        for k, v in summary["stage_seconds"].items():
            times.add_row(k, f"{v:.1f}")
        times.add_row("[bold]wall", f"{summary['wall_seconds']:.1f}")
        self.console.print(times)

    def close(self) -> None:
        self.progress.stop()
