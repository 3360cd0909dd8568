"""components.retention: the last K iteration models, the protected ones and LoRA bases keep their weights;
older ones keep only a manifest marked pruned (still a finished stage); training state stays for the newest."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import torch

from arborl.components.artifacts import manifests, retention, stage_keys, storage
from arborl.components.artifacts.storage import ArtifactError
from arborl.components.training.lora import BASE_FILE
from arborl.components.training.models import load_policy, save_policy

MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json"}


def _train_output(uri: Path, model, tokenizer, iteration: int) -> str:
    save_policy(model, tokenizer, str(uri))
    data = io.BytesIO()
    torch.save({"state": {}, "param_groups": []}, data)
    storage.write_bytes(str(uri / "optimizer.pt"), data.getvalue())
    storage.write_json(str(uri / manifests.MARKER), {"stage": "train"})
    manifests.write_manifest(str(uri), stage="train", inputs={"model": f"m{iteration - 1}"}, config_hash="h",
                           outputs={"model": str(uri)}, metrics={"loss": float(iteration)}, started=time.time(),
                           key=stage_keys.stage_key("train", "h", {}), files=stage_keys.file_digests(str(uri)))
    return str(uri)


@pytest.fixture
def run(tmp_path, tiny_model, tokenizer) -> dict[int, str]:
    return {i: _train_output(tmp_path / f"iter_{i:03d}" / "train", tiny_model, tokenizer, i) for i in range(1, 6)}


def _files(uri: str) -> set[str]:
    return {p.name for p in Path(uri).iterdir()}


def test_keeps_last_k_and_protected_and_prunes_the_rest(run, tmp_path):
    retention.protect(str(tmp_path), run[1])  # e.g. registered by an earlier, shorter run
    protected = [str(tmp_path / "warmstart"), *retention.registered(str(tmp_path))]
    done = retention.prune(run, latest=5, keep=2, protected=protected)
    assert done == {"weights": [run[2], run[3]], "training_state": [run[1], run[2], run[3], run[4]]}
    for i in (2, 3):  # pruned: a manifest marked pruned (the stage is still done) and nothing else
        assert _files(run[i]) == {manifests.MANIFEST, manifests.MARKER}
        manifest = stage_keys.completed(run[i], stage="train", inputs={}, config_hash="h")
        assert manifest is not None and manifest["metrics"] == {"loss": float(i)}
        assert manifest["pruned"]["weights"] and manifest["pruned"]["keep_iterations"] == 2
        with pytest.raises(ArtifactError, match=rf"{run[i]}: its weights were deleted .*run.keep_iterations=2"):
            load_policy(run[i])
    for i in (1, 4):  # protected / among the last 2: weights kept, training state only for the newest
        assert MODEL_FILES <= _files(run[i]) and "optimizer.pt" not in _files(run[i])
        assert manifests.read_manifest(run[i])["pruned"] == {**manifests.read_manifest(run[i])["pruned"],
                                                           "weights": False, "training_state": True}
        load_policy(run[i])
    assert MODEL_FILES | {"optimizer.pt"} <= _files(run[5]) and "pruned" not in manifests.read_manifest(run[5])

    assert retention.prune(run, latest=5, keep=2, protected=[run[1]]) == {"weights": [], "training_state": []}
    assert retention.prune(run, latest=5, keep=None) == {"weights": [], "training_state": []}


def test_an_interrupted_prune_is_finished_and_later_iterations_are_untouched(run):
    manifest = manifests.read_manifest(run[1])
    storage.write_json(manifests.manifest_uri(run[1]), {**manifest, "pruned": {"weights": True, "training_state": True,
                                                                             "at": "t", "keep_iterations": 1}})
    retention.prune(run, latest=3, keep=1)  # an earlier run went to iteration 5; this one ends at 3
    assert _files(run[1]) == _files(run[2]) == {manifests.MANIFEST, manifests.MARKER}
    assert manifests.read_manifest(run[1])["pruned"]["at"] == "t"  # already marked: not marked again
    for i in (3, 4, 5):
        assert MODEL_FILES | {"optimizer.pt"} <= _files(run[i])


def test_the_lora_base_of_a_kept_model_keeps_weights_and_master_state(run):
    storage.write_json(storage.join(run[5], BASE_FILE), {"base": run[2]})
    retention.prune(run, latest=5, keep=1)
    assert MODEL_FILES | {"optimizer.pt"} <= _files(run[2])
    assert all(_files(run[i]) == {manifests.MANIFEST, manifests.MARKER} for i in (1, 3, 4))


def test_registered_models_are_recorded_once(tmp_path):
    assert retention.registered(str(tmp_path)) == []
    retention.protect(str(tmp_path), "a")
    retention.protect(str(tmp_path), "b")
    retention.protect(str(tmp_path), "a")
    assert retention.registered(str(tmp_path)) == ["a", "b"]
    storage.write_json(str(tmp_path / retention.REGISTERED_FILE), {"models": "a"})
    with pytest.raises(ArtifactError, match=retention.REGISTERED_FILE):
        retention.registered(str(tmp_path))
