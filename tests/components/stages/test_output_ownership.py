"""A stage owns only what it created: `run_stage` refuses an output location holding anything else, or overlapping
the stage's inputs, before writing or deleting anything — on local paths and on S3 — and still reruns over its
own stale or half-written output."""

from __future__ import annotations

import json

import pytest

from arborl.components.artifacts import manifests, storage
from arborl.components.config import Config, config_from_dict
from arborl.components.stages import verify
from arborl.components.stages.base import run_stage
from arborl.components.stages.sample import shard_out
from tests.components.artifacts.test_storage import Body  # a stage body that counts its calls

WHERE = ["local", "s3"]


@pytest.fixture(params=WHERE)
def root(request, tmp_path) -> str:
    """A fresh location per test: a local directory or a prefix of the moto bucket."""
    if request.param == "local":
        return str(tmp_path / "data")
    return storage.join(request.getfixturevalue("s3_bucket")[0], tmp_path.name)


def snapshot(uri: str) -> dict[str, bytes]:
    """Every file under `uri` with its content."""
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache()
    return {name: fs.cat_file(name) for name in sorted(fs.find(path))}


def finished(uri: str, stage: str, data: str = "nodes.parquet") -> str:
    """A finished output of `stage` at `uri` (one data file, then its manifest)."""
    storage.write_bytes(storage.join(uri, data), b"precious " + stage.encode())
    manifests.write_manifest(uri, stage=stage, inputs={}, config_hash="h", outputs={}, metrics={}, started=0.0)
    return uri


def verify_inputs(root: str) -> dict[str, str]:
    inputs = storage.join(root, "inputs")
    return {"nodes": finished(storage.join(inputs, "nodes"), "sample"),
            "world": finished(storage.join(inputs, "world"), "prepare", "facts.parquet")}


def refused(out: str, inputs: dict[str, str], *, reason: str) -> str:
    """Run the verify stage to `out` and check it refuses, naming `out` and `reason`; returns the message."""
    with pytest.raises(manifests.OutputNotOwned) as err:
        verify.run(Config(), inputs, out)
    message = str(err.value)
    assert out in message and reason in message and "Nothing was deleted" in message, message
    assert err.value.uri == out and err.value.stage == "verify"
    return message


def test_existing_file_is_refused_and_kept(root):
    inputs = verify_inputs(root)
    out = storage.join(root, "notes.txt")
    storage.write_bytes(out, b"my notes")
    before = snapshot(root)
    refused(out, inputs, reason="it is an existing file")
    assert snapshot(root) == before
    assert storage.read_bytes(out) == b"my notes"


def test_directory_with_foreign_files_is_refused_and_kept(root):
    inputs = verify_inputs(root)
    out = storage.join(root, "mine")
    storage.write_bytes(storage.join(out, "notes.txt"), b"my notes")
    storage.write_bytes(storage.join(out, "sub", "more.txt"), b"more")
    before = snapshot(root)
    message = refused(out, inputs, reason="non-empty directory that is no stage's output")
    assert "notes.txt" in message and "sub" in message
    assert snapshot(root) == before


@pytest.mark.parametrize("spelling", ["same", "trailing slash", "dot-dot"])
def test_output_equal_to_an_input_is_refused_and_the_input_kept(root, spelling):
    inputs = verify_inputs(root)
    nodes = inputs["nodes"]
    out = {"same": nodes, "trailing slash": nodes + "/", "dot-dot": storage.join(nodes, "..", "nodes")}[spelling]
    before = snapshot(root)
    refused(out, inputs, reason=f"it is the stage's input 'nodes' ({nodes})")
    assert snapshot(root) == before


def test_local_output_equal_to_an_input_in_another_spelling_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inputs = verify_inputs("data")  # relative input URIs
    before = snapshot(str(tmp_path))
    for out in (str(tmp_path / "data" / "inputs" / "nodes"), f"file://{tmp_path}/data/inputs/nodes/"):
        refused(out, inputs, reason="it is the stage's input 'nodes'")
    assert snapshot(str(tmp_path)) == before


def test_output_inside_an_input_is_refused(root):
    inputs = verify_inputs(root)
    before = snapshot(root)
    refused(storage.join(inputs["world"], "verify"), inputs, reason="it lies inside the stage's input 'world'")
    assert snapshot(root) == before


def test_output_containing_an_input_is_refused(root):
    inputs = verify_inputs(root)
    before = snapshot(root)
    refused(storage.join(root, "inputs"), inputs, reason="it contains the stage's input 'nodes'")
    assert snapshot(root) == before


def test_a_sibling_with_a_longer_name_is_no_overlap(root):
    """`<out>-shards/...` and `run2` do not lie inside `<out>` and `run`: component boundaries, not prefixes."""
    out = storage.join(root, "run")
    for name, uri in (("shard", shard_out(out, 0, 2)), ("other", storage.join(root, "run2"))):
        finished(uri, "sample")
        body = Body(out)
        run_stage("sample", Config(), {name: uri}, out, ("sampling",), body, iteration=1)
        assert body.calls == 1
        assert storage.read_bytes(storage.join(uri, "nodes.parquet")) == b"precious sample"


@pytest.mark.parametrize("file", [manifests.MANIFEST, manifests.MARKER])
def test_output_of_another_stage_is_refused_and_kept(root, file):
    inputs = verify_inputs(root)
    out = storage.join(root, "labelled")
    if file == manifests.MANIFEST:
        finished(out, "label", "advantages.parquet")
    else:  # a half-written output of another stage
        storage.write_json(storage.join(out, manifests.MARKER), {"stage": "label"})
        storage.write_bytes(storage.join(out, "advantages.parquet"), b"half")
    before = snapshot(root)
    refused(out, inputs, reason=f"it holds an output of stage 'label' (its {file})")
    assert snapshot(root) == before


# --- its own earlier output: rerun over it ------------------------------------------------------------


def names(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache()
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))


def test_stale_own_output_is_wiped_and_rerun(root):
    inputs = verify_inputs(root)
    out = storage.join(root, "verify")
    body = Body(out)
    assert not run_stage("verify", Config(), inputs, out, ("verify",), body).skipped
    storage.write_bytes(storage.join(out, "leftover.parquet"), b"from the old config")
    changed = config_from_dict({"verify": {"correct_format": 0.9}})
    assert not run_stage("verify", changed, inputs, out, ("verify",), body).skipped
    assert body.calls == 2
    assert names(out) == [manifests.MANIFEST, manifests.MARKER, "data.json"]
    assert storage.read_json(storage.join(out, "data.json")) == {"call": 2}
    assert run_stage("verify", changed, inputs, out, ("verify",), body).skipped


def test_half_written_own_output_is_wiped_and_rerun_keeping_resume_state(root):
    inputs = verify_inputs(root)
    out = storage.join(root, "train")

    def crash():
        storage.write_bytes(storage.join(out, "_checkpoints", "step-00000002", "state.pt"), b"resume me")
        storage.write_bytes(storage.join(out, "model.safetensors"), b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_stage("train", Config(), inputs, out, ("train",), crash, keep=("_checkpoints",), iteration=1)
    assert storage.read_json(storage.join(out, manifests.MARKER)) == {"stage": "train"}
    assert manifests.read_manifest(out) is None
    body = Body(out)
    seen = []

    def resume():
        seen.append(names(out))
        return body()

    assert not run_stage("train", Config(), inputs, out, ("train",), resume, keep=("_checkpoints",),
                         iteration=1).skipped
    assert seen == [["_checkpoints", manifests.MARKER]]  # the half model went, the checkpoints stayed
    assert storage.read_bytes(storage.join(out, "_checkpoints", "step-00000002", "state.pt")) == b"resume me"
    assert manifests.read_manifest(out)["stage"] == "train"
    # another stage may not take the place over
    with pytest.raises(manifests.OutputNotOwned, match="stage 'train'"):
        run_stage("label", Config(), inputs, out, ("advantage",), Body(out))
    assert manifests.read_manifest(out)["stage"] == "train"


def test_output_from_before_markers_is_still_its_stages(tmp_path):
    """An output finished before stages wrote markers (a manifest, no marker) reruns as before."""
    out = str(tmp_path / "verify")
    finished(out, "verify", "rewards.parquet")
    inputs = verify_inputs(str(tmp_path))
    body = Body(out)
    assert not run_stage("verify", Config(), inputs, out, ("verify",), body).skipped
    assert names(out) == [manifests.MANIFEST, manifests.MARKER, "data.json"]


def test_refusal_is_raised_before_the_body_and_on_every_rank(tmp_path):
    """Ranks that do not write (`writer=False`) refuse an overlapping output too, without reading it."""
    inputs = verify_inputs(str(tmp_path))
    body = Body(inputs["nodes"])
    with pytest.raises(manifests.OutputNotOwned):
        run_stage("train", Config(), inputs, inputs["nodes"], ("train",), body, writer=False, iteration=1)
    assert body.calls == 0
    assert json.loads((tmp_path / "inputs" / "nodes" / manifests.MANIFEST).read_text())["stage"] == "sample"
