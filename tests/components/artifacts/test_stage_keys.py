"""components.stage_keys: content-chained cache keys. A change upstream makes every downstream output stale and
nothing upstream; an input is named by what it holds, not by its path; changed or missing files are noticed."""

from __future__ import annotations

import os

import pytest

from arborl.components.artifacts import manifests, stage_keys, storage


def _finish(out: str, stage: str, inputs: dict[str, str], config_hash: str, content: bytes) -> dict:
    storage.write_bytes(storage.join(out, "data.bin"), content)
    return manifests.write_manifest(out, stage=stage, inputs=inputs, config_hash=config_hash, outputs={}, metrics={},
                                  started=0.0, key=stage_keys.stage_key(stage, config_hash, inputs),
                                  files=stage_keys.file_digests(out))


def test_a_rerun_upstream_makes_everything_downstream_stale(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    _finish(a, "verify", {}, "h", b"rewards v1")
    _finish(b, "label", {"rewards": a}, "h", b"advantages")
    _finish(c, "train", {"advantages": b}, "h", b"weights")
    assert stage_keys.completed(b, stage="label", inputs={"rewards": a}, config_hash="h") is not None
    assert stage_keys.completed(c, stage="train", inputs={"advantages": b}, config_hash="h") is not None
    # another config of the stage itself, or another stage name: not this output
    assert stage_keys.completed(b, stage="label", inputs={"rewards": a}, config_hash="g") is None
    assert stage_keys.completed(b, stage="train", inputs={"rewards": a}, config_hash="h") is None
    # verify reruns into the same URI with other results (e.g. a new verify.reward): label is stale ...
    _finish(a, "verify", {}, "h2", b"rewards v2")
    assert stage_keys.completed(b, stage="label", inputs={"rewards": a}, config_hash="h") is None
    # ... and once label reruns, so is train, whose input URI never changed
    _finish(b, "label", {"rewards": a}, "h", b"new advantages")
    assert stage_keys.completed(c, stage="train", inputs={"advantages": b}, config_hash="h") is None


def test_an_input_is_what_it_holds_not_where_it_is(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _finish(a, "prepare", {}, "h", b"world")
    _finish(b, "warmstart", {"world": a}, "h", b"model")
    monkeypatch.chdir(tmp_path)
    assert stage_keys.completed(b, stage="warmstart", inputs={"world": "a"}, config_hash="h") is not None
    assert stage_keys.completed(b, stage="warmstart", inputs={"world": os.path.relpath(a)}, config_hash="h")
    moved = str(tmp_path / "moved")
    os.rename(a, moved)
    assert stage_keys.completed(b, stage="warmstart", inputs={"world": moved}, config_hash="h") is not None
    assert stage_keys.completed(b, stage="warmstart", inputs={"world": a}, config_hash="h") is None  # gone


def test_changed_or_missing_files_are_noticed_pruned_ones_are_not(tmp_path):
    out = str(tmp_path / "s")
    manifest = _finish(out, "sample", {}, "h", b"nodes" * 100)
    assert set(manifest["files"]) == {"data.bin"} and manifest["files"]["data.bin"]["size"] == 500
    assert stage_keys.changed_file(out, manifest) is None
    storage.write_bytes(storage.join(out, "data.bin"), b"nodes" * 99)  # truncated
    assert stage_keys.changed_file(out, manifest) == "data.bin (changed since it was written)"
    assert stage_keys.completed(out, stage="sample", inputs={}, config_hash="h") is None
    storage.write_bytes(storage.join(out, "data.bin"), b"nodez" * 100)  # same size, other bytes
    assert stage_keys.completed(out, stage="sample", inputs={}, config_hash="h") is None
    os.remove(os.path.join(out, "data.bin"))
    assert stage_keys.changed_file(out, manifest) == "data.bin (missing)"
    # a retention prune deletes files on purpose and says so in the manifest: still finished
    storage.write_json(manifests.manifest_uri(out), {**manifest, "pruned": {"weights": True, "keep_iterations": 2}})
    assert stage_keys.completed(out, stage="sample", inputs={}, config_hash="h") is not None
    # an old manifest without key or digests is stale
    storage.write_json(manifests.manifest_uri(out), {k: v for k, v in manifest.items() if k not in ("key", "files")})
    assert stage_keys.completed(out, stage="sample", inputs={}, config_hash="h") is None


def test_nothing_starts_on_a_pruned_or_unfinished_input(tmp_path):
    model = str(tmp_path / "iter_001" / "train")
    manifest = _finish(model, "train", {}, "h", b"weights")
    stage_keys.check_inputs("sample", {"model": model})
    storage.write_json(manifests.manifest_uri(model), {**manifest, "pruned": {"weights": True, "keep_iterations": 2}})
    with pytest.raises(FileNotFoundError, match=r"'model' .* pruned \(run.keep_iterations=2\); nothing was changed"):
        stage_keys.check_inputs("sample", {"model": model})
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        stage_keys.check_inputs("sample", {"model": str(tmp_path / "nope")})
