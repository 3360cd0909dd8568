"""components.bench.training: the packed-vs-duplicated benchmark on trees sampled by the micro config."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from arborl.components.bench.training import bench_training
from arborl.components.config import load_config
from arborl.flows.cli import app


@pytest.mark.slow  # starts processes
def test_bench_training_reports_side_by_side_numbers(tmp_path, repo_root):
    cfg = load_config(repo_root / "configs" / "micro.yaml")
    result = bench_training(cfg, str(tmp_path / "bench"), warmstart_steps=150, repeats=1)
    for key in ("dup_tokens", "unique_tokens", "ideal_speedup", "packed_speedup", "max_rel_grad_diff",
                "peak_rss_mb_packed", "peak_rss_mb_dup"):
        assert math.isfinite(result[key]) and result[key] >= 0, key
    assert result["trajectories"] > result["trees"] > 0
    assert result["dup_tokens"] > result["unique_tokens"]  # trees share prefixes
    assert result["ideal_speedup"] == result["dup_tokens"] / result["unique_tokens"]
    assert result["max_rel_grad_diff"] <= 1e-5  # the two forms give the same gradients


@pytest.mark.slow  # starts processes
def test_bench_training_command_prints_json(tmp_path, repo_root):
    out = CliRunner().invoke(app, ["bench", "training", "--config", str(repo_root / "configs" / "micro.yaml"),
                                   "--workdir", str(tmp_path / "b"), "--warmstart-steps", "150", "--repeats", "1",
                                   "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert data["unique_tokens"] < data["dup_tokens"]
