"""The `arborl` CLI: config validation messages and single stages run on given input URIs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from arborl.flows.cli import app

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
    assert res.exit_code == 2  # the user's input
    assert "model" in res.output and "nope" in res.output


def test_stage_with_wrong_inputs_lists_what_it_needs(tmp_path):
    res = runner.invoke(app, ["stage", "label", "--config", MICRO, "--in", "nodes=x", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "rewards" in res.output


def test_sample_shards_from_the_command_line_merge_to_the_unsharded_output(tmp_path):
    cfg = ["--config", MICRO]
    w, m = str(tmp_path / "prepare"), str(tmp_path / "model0")
    _stage("prepare", *cfg, "--out", w)
    _stage("warmstart", *cfg, "--in", f"world={w}", "--out", m)
    ins = ["--in", f"model={m}", "--in", f"world={w}"]
    whole = _stage("sample", *cfg, *ins, "--out", str(tmp_path / "whole"))
    parts = [str(tmp_path / f"part{i}") for i in range(2)]
    for i, part in enumerate(parts):
        _stage("sample", *cfg, *ins, "--out", part, "--shard", f"{i}/2")
    res = runner.invoke(app, ["merge-shards", *parts, *cfg, "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged = json.loads(res.output)
    for key in ("trajectories", "generated_tokens", "nodes", "prompts"):
        assert merged["metrics"][key] == whole["metrics"][key]
    a = [{k: v for k, v in r.items() if k != "logprobs"}
         for r in storage_rows(tmp_path / "whole" / "nodes.parquet")]
    b = [{k: v for k, v in r.items() if k != "logprobs"}
         for r in storage_rows(tmp_path / "merged" / "nodes.parquet")]
    assert a == b

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    refused = runner.invoke(app, ["merge-shards", *parts, *cfg, "--out", str(notes)])
    assert refused.exit_code == 3 and "existing file" in refused.output and notes.read_text() == "mine"
    refused = runner.invoke(app, ["merge-shards", *parts, *cfg, "--out", parts[0]])  # a shard is an input
    assert refused.exit_code == 3 and "input" in refused.output
    assert (tmp_path / "part0" / "_manifest.json").exists()

    bad = runner.invoke(app, ["stage", "sample", *cfg, *ins, "--out", str(tmp_path / "x"), "--shard", "2/2"])
    assert bad.exit_code == 2 and "0 <= i < n" in " ".join(bad.output.split())
    bad = runner.invoke(app, ["stage", "prepare", *cfg, "--out", str(tmp_path / "y"), "--shard", "0/2"])
    assert bad.exit_code == 2 and "sample stage only" in bad.output


def storage_rows(path):
    from arborl.components.artifacts import storage

    return storage.read_parquet(str(path)).to_pylist()


def _finished(path: Path, stage: str) -> str:
    """A finished stage output at `path`: one data file and its manifest."""
    from arborl.components.artifacts import manifests

    (path).mkdir(parents=True)
    (path / "data.parquet").write_bytes(b"precious")
    manifests.write_manifest(str(path), stage=stage, inputs={}, config_hash="h", outputs={}, metrics={}, started=0.0)
    return str(path)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_stage_refuses_an_existing_file_as_its_output_and_keeps_it(tmp_path):
    nodes, world = _finished(tmp_path / "sample", "sample"), _finished(tmp_path / "prepare", "prepare")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    before = _files(tmp_path)
    res = runner.invoke(app, ["stage", "verify", "--config", MICRO, "--in", f"nodes={nodes}", "--in",
                              f"world={world}", "--out", str(notes)])
    assert res.exit_code == 3, res.output  # a conflict: the location is not this stage's
    assert f"output refused: stage 'verify' will not write its output to {notes}: it is an existing file" in res.output
    assert "Nothing was deleted" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert _files(tmp_path) == before


def test_stage_refuses_its_input_as_its_output_and_keeps_it(tmp_path):
    nodes, world = _finished(tmp_path / "sample", "sample"), _finished(tmp_path / "prepare", "prepare")
    before = _files(tmp_path)
    res = runner.invoke(app, ["stage", "verify", "--config", MICRO, "--in", f"nodes={nodes}", "--in",
                              f"world={world}", "--out", nodes + "/"])
    assert res.exit_code == 3, res.output
    assert f"to {nodes}/: it is the stage's input 'nodes' ({nodes})" in res.output
    assert _files(tmp_path) == before


def test_run_name_cannot_lead_out_of_the_output_root(tmp_path):
    root = tmp_path / "a" / "b"
    res = runner.invoke(app, ["run", "--config", MICRO, f"run.output_root={root}", "run.name=../../escaped",
                              "run.iterations=0", "tracking.enabled=false"])
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.split())
    assert "run.name" in flat and "'../../escaped'" in flat
    assert not (tmp_path / "escaped").exists() and not root.exists()


def test_every_command_follows_one_error_policy(tmp_path):
    """promote and report fail like run and stage: exit 2 for the user's input, 1 for an internal failure, one
    stderr line naming the command, the error and where the traceback is."""
    res = runner.invoke(app, ["promote", "--config", MICRO, f"run.output_root={tmp_path}"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("promote failed (input): ValueError: registered model "
                                                   "'arborl-micro' has no 'challenger' version"), res.stderr
    assert "(the traceback: arborl --debug ...)" in " ".join(res.stderr.split())
    res = runner.invoke(app, ["--debug", "promote", "--config", MICRO, f"run.output_root={tmp_path}"])
    assert res.exit_code == 2 and "Traceback" in res.stderr
    res = runner.invoke(app, ["export-corpus", "--world", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and res.stderr.startswith("export-corpus failed (input): FileNotFoundError:")
