"""components.bench.warmstart: packed warm-start rows against the padded batch, on the micro world."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from arborl.components.bench.warmstart import bench_warmstart
from arborl.components.config import load_config
from arborl.flows.cli import app


def test_bench_warmstart_reports_side_by_side_numbers(tmp_path, repo_root):
    cfg = load_config(repo_root / "configs" / "micro.yaml")
    result = bench_warmstart(cfg, str(tmp_path / "bench"), repeats=2)
    for key in ("padded_seconds", "packed_seconds", "packed_speedup", "max_rel_grad_diff"):
        assert math.isfinite(result[key]) and result[key] >= 0, key
    assert result["real_tokens_per_batch"] <= result["packed_tokens_per_batch"] < result["padded_tokens_per_batch"]
    assert result["max_rel_grad_diff"] <= 1e-5  # the two forms give the same gradients
    assert result["packed_speedup"] == result["padded_seconds"] / result["packed_seconds"]


def test_bench_warmstart_command_prints_json(tmp_path, repo_root):
    out = CliRunner().invoke(app, ["bench", "warmstart", "--config", str(repo_root / "configs" / "micro.yaml"),
                                   "--workdir", str(tmp_path / "b"), "--repeats", "1", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output.strip().splitlines()[-1])
    assert data["packed_tokens_per_batch"] < data["padded_tokens_per_batch"]
