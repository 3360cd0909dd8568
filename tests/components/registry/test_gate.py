"""registry.gate: the promotion decision on per-question scores (better / worse / tie / incomplete)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arborl.components.registry.gate import INCOMPLETE, PROMOTE, REJECT, gate, paired_scores

RNG = np.random.default_rng(0)
BASE = RNG.binomial(1, 0.4, size=200).astype(float)


def test_clearly_better_challenger_is_promoted():
    better = BASE.copy()
    better[np.flatnonzero(BASE == 0)[:40]] = 1.0  # 40 more questions right, none lost
    d = gate(better, BASE, margin=0.0, expected=200)
    assert d.decision == PROMOTE and d.promoted
    assert d.delta == pytest.approx(0.2) and d.n == 200
    assert 0.0 < d.ci_low < 0.2 < d.ci_high
    assert d.challenger == pytest.approx(BASE.mean() + 0.2) and d.baseline == pytest.approx(BASE.mean())


def test_worse_challenger_is_rejected():
    worse = BASE.copy()
    worse[np.flatnonzero(BASE == 1)[:30]] = 0.0
    d = gate(worse, BASE, margin=0.0, expected=200)
    assert d.decision == REJECT and not d.promoted and d.delta < 0
    assert "no improvement" in d.reason


def test_tie_is_rejected():
    d = gate(BASE, BASE.copy(), margin=0.0)
    assert d.decision == REJECT and d.delta == 0.0 and d.ci_low == 0.0


def test_small_noisy_gain_below_the_margin_is_rejected():
    a = BASE.copy()
    flip_up, flip_down = np.flatnonzero(BASE == 0)[:12], np.flatnonzero(BASE == 1)[:8]
    a[flip_up], a[flip_down] = 1.0, 0.0  # +4 questions net, but 20 changed: the interval straddles 0
    d = gate(a, BASE, margin=0.0)
    assert d.delta == pytest.approx(0.02) and d.ci_low <= 0.0 and d.decision == REJECT
    strong = BASE.copy()
    strong[np.flatnonzero(BASE == 0)[:40]] = 1.0
    assert gate(strong, BASE, margin=0.5).decision == REJECT  # a margin above the gain blocks promotion


@pytest.mark.parametrize(
    "challenger, baseline, expected, why",
    [
        (None, BASE, 200, "challenger evaluation failed"),
        (BASE, None, 200, "baseline evaluation failed"),
        (BASE[:150], BASE[:150], 200, "150 scores for 200 questions"),
        (BASE[:150], BASE, 200, "challenger has 150 scores"),
        (np.where(np.arange(200) == 3, math.nan, 1.0), BASE, 200, "1 missing or NaN"),
        (np.array([]), np.array([]), None, "0 scores"),
    ],
)
def test_incomplete_evaluation_never_promotes(challenger, baseline, expected, why):
    d = gate(challenger, baseline, margin=-1.0, expected=expected)  # even a margin anything would pass
    assert d.decision == INCOMPLETE and not d.promoted
    assert why in d.reason


def test_paired_scores_align_by_question_and_mark_missing():
    got = paired_scores({"q2": 1.0, "q1": 0.0}, ["q1", "q2", "q3"])
    assert got[0] == 0.0 and got[1] == 1.0 and math.isnan(got[2])
    assert paired_scores(None, ["q1"]) is None
    assert gate(got, np.ones(3), margin=0.0).decision == INCOMPLETE


def test_decision_tags_are_strings():
    tags = gate(BASE, BASE, margin=0.0, metric="em_sampled").tags()
    assert tags["gate.decision"] == REJECT and tags["gate.metric"] == "em_sampled" and tags["gate.n"] == "200"
    assert all(isinstance(v, str) for v in tags.values())


def test_promotion_description_states_the_decision_with_its_numbers():
    from arborl.components.registry.gate import GateDecision
    from arborl.components.registry.promotion import Promotion

    better = BASE.copy()
    better[np.flatnonzero(BASE == 0)[:40]] = 1.0
    promoted = Promotion(gate(better, BASE, margin=0.0, expected=200), "m", "2", "champion v1", "1", "2", None)
    text = promoted.description("test")
    assert text.startswith("Promoted to champion: em ") and "vs" in text and "for the champion v1 on 200 test" in text
    assert "paired improvement +0.200 with 95% interval [" in text and text.endswith("above the margin 0.")
    rejected = Promotion(gate(BASE, better, margin=0.0, expected=200), "m", "3", "champion v2", "2", "2", None)
    text = rejected.description("val")
    assert text.startswith("Not promoted (champion stays v2): em ") and "on 200 val questions" in text
    assert text.endswith(", no improvement.") and "on 200 questions" in rejected.description()
    first = Promotion(GateDecision(INCOMPLETE, "challenger evaluation failed", "em", 0.0, 0), "m", "1", "warm start",
                      None, None, None)
    assert first.description() == ("Not promoted: the gate against the warm start was incomplete (challenger "
                                    "evaluation failed).")
