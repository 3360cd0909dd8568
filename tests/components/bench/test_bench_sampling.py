"""`arborl bench sampling --quick --json`: runs end to end on a small world and reports every number.

Only the report's shape and sanity are checked here; the speed targets are read from a full run's output.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from arborl.components.sampling.engine import cpu_kernels
from arborl.flows.cli import app

SMALL = ["world.num_people=60", "world.num_train=50", "world.num_val=10", "world.num_test=20", "run.threads=1",
         "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64"]


def test_quick_bench_reports_finite_positive_numbers():
    result = CliRunner().invoke(app, ["bench", "sampling", "--quick", "--json", *SMALL])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    for key in ("tree_vs_chain_traj_per_token", "tree_vs_chain_traj_per_second", "peak_rss_mb",
                "tree_traj_per_token", "chain_traj_per_token", "first_step_max_abs_logit_diff"):
        assert math.isfinite(report[key]), key
    for key in ("tree_vs_chain_traj_per_token", "tree_vs_chain_traj_per_second", "peak_rss_mb"):
        assert report[key] > 0, key
    assert report["tree_trajectories"] == report["chain_trajectories"] == 6 * report["prompts"]
    processed = {m: report[f"{m}_generated_tokens"] + report[f"{m}_prefilled_tokens"] for m in ("tree", "chain")}
    assert report["tree_vs_chain_traj_per_processed_token"] == pytest.approx(processed["chain"] / processed["tree"])
    # the official draw's expected per-token ratio: 6 trajectories for 2·(1 + 2c) chains
    cost = report["random_expansion_cost"]
    # per prompt, the fresh-chain terms sum to at most its chains' tokens and the suffix terms to less: c < 2
    # (above 1 where short chains, which draw the root more often, sit beside long ones)
    assert 0 < cost < 2
    assert report["tree_vs_chain_traj_per_token_expected"] == pytest.approx(3 / (1 + 2 * cost))
    alpha = report["prefill_vs_decode_token_cost"]
    assert alpha > 0 and report["prefill_tokens_per_s"] > 0
    work = {m: report[f"{m}_generated_tokens"] + alpha * report[f"{m}_prefilled_tokens"] for m in ("tree", "chain")}
    assert report["tree_vs_chain_traj_per_second_ceiling"] == pytest.approx(work["chain"] / work["tree"])
    ratios = report["backend_vs_generate_tokens_per_s"]
    assert set(ratios) == {"8"} and all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert report["first_step_max_abs_logit_diff"] < 1e-4
    assert report["greedy_tokens_equal_generate"] is True
    # head dim 16: the fused forward decodes through the compiled kernel wherever it builds
    assert report["forward"] == "fused"
    assert report["cpu_attention_kernel"] is (cpu_kernels.decode_attention() is not None)
