"""The `arborl` CLI: config validation messages and single stages run on given input URIs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "configs" / "micro.yaml")
runner = CliRunner()


def test_config_prints_resolved_values():
    res = runner.invoke(app, ["config", "--config", MICRO, "run.iterations=7", "sampling.keep_leaves=2"])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(res.output)
    assert data["run"]["iterations"] == 7 and data["sampling"]["keep_leaves"] == 2


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  iteratoins: 3\n")
    res = runner.invoke(app, ["config", "--config", str(bad)])
    assert res.exit_code == 2
    flat = " ".join(res.output.split())
    assert "run.iteratoins" in flat and "bad.yaml" in flat


def _stage(*args: str) -> dict:
    res = runner.invoke(app, ["stage", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_stages_run_one_by_one_on_uris(tmp_path):
    out = tmp_path / "s"
    cfg = ["--config", MICRO]
    world = _stage("prepare", *cfg, "--out", str(out / "prepare"))
    assert world["metrics"]["test_prompts"] == 12 and not world["skipped"]
    again = _stage("prepare", *cfg, "--out", str(out / "prepare"))
    assert again["skipped"]
    w = str(out / "prepare")
    _stage("warmstart", *cfg, "--in", f"world={w}", "--out", str(out / "model0"))
    s = _stage("sample", *cfg, "--in", f"model={out / 'model0'}", "--in", f"world={w}", "--out", str(out / "sample"))
    assert s["metrics"]["trajectories"] == 4 * 2 * 3  # prompts × M × (1 + L·N)
    _stage("verify", *cfg, "--in", f"nodes={out / 'sample'}", "--in", f"world={w}", "--out", str(out / "verify"))
    lab = _stage("label", *cfg, "--in", f"nodes={out / 'sample'}", "--in", f"rewards={out / 'verify'}", "--in",
                 f"world={w}", "--out", str(out / "label"))
    assert {"advantages", "preferences", "granularity", "trees"} <= set(lab["outputs"])
    t = _stage("train", *cfg, "--in", f"model={out / 'model0'}", "--in", f"nodes={out / 'sample'}", "--in",
               f"advantages={out / 'label'}", "--in", f"world={w}", "--out", str(out / "model1"))
    assert (Path(t["outputs"]["model"]) / "config.json").exists()
    e = _stage("evaluate", *cfg, "--in", f"model={out / 'model1'}", "--in", f"world={w}", "--out", str(out / "eval"))
    assert 0.0 <= e["metrics"]["test_em"] <= 1.0


def test_stage_with_missing_input_fails_clearly(tmp_path):
    res = runner.invoke(app, ["stage", "sample", "--config", MICRO, "--in", f"model={tmp_path / 'nope'}",
                              "--in", f"world={tmp_path / 'nope2'}", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "model" in res.output and "nope" in res.output


def test_stage_with_wrong_inputs_lists_what_it_needs(tmp_path):
    res = runner.invoke(app, ["stage", "label", "--config", MICRO, "--in", "nodes=x", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "rewards" in res.output
