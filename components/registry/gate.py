"""The promotion gate: a pure decision on two per-question score arrays (no MLflow).

`gate` promotes when the mean paired improvement is positive and its bootstrap lower bound exceeds the margin;
missing, NaN or too few scores give `incomplete`, which never promotes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from arborl.components.evaluation.metrics import paired_bootstrap

CHALLENGER, CHAMPION = "challenger", "champion"
PROMOTE, REJECT, INCOMPLETE = "promote", "reject", "incomplete"


@dataclass(frozen=True)
class GateDecision:
    """Outcome of comparing a challenger with a baseline on the same questions (scores in [0, 1] per question).

    `delta` is the mean per-question improvement challenger − baseline; `ci_low`/`ci_high` its 95% paired
    bootstrap interval; `n` the number of paired questions.
    """

    decision: str  # promote / reject / incomplete
    reason: str
    metric: str
    margin: float
    n: int
    challenger: float = math.nan
    baseline: float = math.nan
    delta: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTE

    def tags(self) -> dict[str, str]:
        """The decision as registry tags `gate.<field>`."""
        return {f"gate.{k}": (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in asdict(self).items()}


def gate(
    challenger: np.ndarray | list[float] | None,
    baseline: np.ndarray | list[float] | None,
    margin: float,
    metric: str = "em",
    expected: int | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> GateDecision:
    """Promote when the mean paired improvement is positive and its bootstrap lower bound exceeds `margin`.

    `challenger` and `baseline` hold one score per question in the same question order (None: that
    evaluation failed). Missing scores, NaN, unequal lengths or fewer than `expected` questions give
    `incomplete`, which never promotes.
    """

    def incomplete(reason: str, n: int = 0) -> GateDecision:
        return GateDecision(INCOMPLETE, reason, metric, margin, n)

    if challenger is None or baseline is None:
        return incomplete(f"{'challenger' if challenger is None else 'baseline'} evaluation failed")
    a, b = np.asarray(challenger, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        return incomplete(f"challenger has {a.size} scores, baseline {b.size}")
    if a.size == 0 or (expected is not None and a.size < expected):
        return incomplete(f"{a.size} scores for {expected} questions", a.size)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        missing = int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
        return incomplete(f"{missing} missing or NaN scores", a.size)
    ci = paired_bootstrap(a, b, resamples=resamples, seed=seed)
    stats = {"n": a.size, "challenger": float(a.mean()), "baseline": float(b.mean()), "delta": ci.estimate,
             "ci_low": ci.low, "ci_high": ci.high}
    if ci.estimate > 0 and ci.low > margin:
        return GateDecision(PROMOTE, f"improvement {ci.estimate:+.4f}, lower bound {ci.low:.4f} > margin {margin}",
                            metric, margin, **stats)
    why = "no improvement" if ci.estimate <= 0 else f"lower bound {ci.low:.4f} <= margin {margin}"
    return GateDecision(REJECT, f"improvement {ci.estimate:+.4f}: {why}", metric, margin, **stats)


def paired_scores(scores: dict[str, float] | None, question_ids: list[str]) -> np.ndarray | None:
    """Scores in `question_ids` order; a question without a score becomes NaN (so the gate sees it)."""
    if scores is None:
        return None
    return np.array([scores.get(q, math.nan) for q in question_ids], dtype=np.float64)
