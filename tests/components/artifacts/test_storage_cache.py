"""artifacts.local_cache.local_dir: the bounded local cache of remote (S3, a local moto server) directories."""

from __future__ import annotations

import io
import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

from arborl.components.artifacts import local_cache, manifests, model_files, storage
from arborl.components.config import Config, StorageConfig
from arborl.components.training.models import load_policy, save_policy

MB = 1_000_000


@pytest.fixture
def s3_root(s3_bucket):
    root, _ = s3_bucket
    return f"{root}/{uuid.uuid4().hex}"


def _upload(root: str, name: str, size: int) -> str:
    uri = storage.join(root, name)
    storage.write_bytes(storage.join(uri, "weights.bin"), os.urandom(size))
    storage.write_json(storage.join(uri, "config.json"), {"name": name})
    return uri


def _cached(cache: Path) -> dict[str, str]:
    """{cached directory: the name in its config.json} of the complete copies in `cache`."""
    return {p.name: storage.read_json(str(p / "config.json"))["name"]
            for p in cache.iterdir() if not p.name.startswith(".tmp-")}


def test_least_recently_used_copies_beyond_the_bound_are_deleted(s3_root, tmp_path, monkeypatch):
    monkeypatch.setattr(local_cache, "CACHE_IN_USE_S", 0.0)
    cache = tmp_path / "cache"
    a, b, c = (_upload(s3_root, n, MB) for n in ("a", "b", "c"))
    bound = 2.5 * MB / 1e9  # room for two copies
    for uri in (a, b, a):  # a read again: b is now the least recently used
        local_cache.local_dir(uri, cache, max_gb=bound)
        time.sleep(0.02)
    assert sorted(_cached(cache).values()) == ["a", "b"]
    assert (local_cache.local_dir(c, cache, max_gb=bound) / "config.json").exists()
    assert sorted(_cached(cache).values()) == ["a", "c"]
    time.sleep(0.02)
    local_cache.local_dir(b, cache, max_gb=bound)  # fetched again; now a is the oldest
    assert sorted(_cached(cache).values()) == ["b", "c"]
    # no bound: nothing is deleted
    local_cache.local_dir(a, cache, max_gb=None)
    assert sorted(_cached(cache).values()) == ["a", "b", "c"]


def test_copies_in_use_are_kept_over_the_bound_until_they_age(s3_root, tmp_path):
    cache = tmp_path / "cache"
    uris = [_upload(s3_root, n, MB) for n in ("a", "b", "c")]
    for uri in uris:
        local_cache.local_dir(uri, cache, max_gb=0)
    assert sorted(_cached(cache).values()) == ["a", "b", "c"]  # all read within CACHE_IN_USE_S
    old = time.time() - local_cache.CACHE_IN_USE_S - 5
    for path in cache.iterdir():
        if _cached(cache).get(path.name) in ("a", "b"):
            os.utime(path / ".complete", (old, old))
    local_cache.local_dir(uris[2], cache, max_gb=0)
    assert list(_cached(cache).values()) == ["c"]  # the copy just read is never deleted


def test_a_model_is_read_without_its_optimizer_state_and_within_the_configured_bound(
        s3_root, tmp_path, monkeypatch, tokenizer, tiny_model):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the default cache root: $TMPDIR/arborl-cache
    uri = storage.join(s3_root, "iter_001", "train")
    save_policy(tiny_model, tokenizer, uri)
    data = io.BytesIO()
    torch.save({"state": {i: torch.zeros(1000) for i in range(20)}}, data)
    storage.write_bytes(storage.join(uri, "optimizer.pt"), data.getvalue())
    storage.write_bytes(storage.join(uri, "_checkpoints", "step-00000002", "state.pt"), data.getvalue())
    storage.write_json(storage.join(uri, manifests.MANIFEST), {"stage": "train"})

    model, _ = load_policy(uri, "cpu", Config().storage.cache_max_gb)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_model.parameters())
    (copy,) = [p for p in (tmp_path / "arborl-cache").iterdir() if not p.name.startswith(".tmp-")]
    files = {str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()}
    assert "config.json" in files and "model.safetensors" in files and manifests.MANIFEST in files
    assert "optimizer.pt" not in files and not any(f.startswith("_checkpoints") for f in files)

    # another model over a bound of zero: the first copy goes once it is no longer in use
    monkeypatch.setattr(local_cache, "CACHE_IN_USE_S", 0.0)
    other = storage.join(s3_root, "iter_002", "train")
    save_policy(tiny_model, tokenizer, other)
    load_policy(other, "cpu", cache_max_gb=0)
    (left,) = [p for p in (tmp_path / "arborl-cache").iterdir() if not p.name.startswith(".tmp-")]
    assert left != copy


def test_the_bound_is_a_config_key_with_the_library_default():
    assert StorageConfig().cache_max_gb == local_cache.CACHE_MAX_GB
    assert Config.model_validate({"storage": {"cache_max_gb": 1}}).storage.cache_max_gb == 1.0
    with pytest.raises(ValueError, match="cache_max_gb"):
        Config.model_validate({"storage": {"cache_max_gb": -1}})


def test_the_skipped_training_state_is_what_the_train_stage_writes():
    from arborl.components.stages.train import CHECKPOINT_DIR, OPTIMIZER_FILE

    assert set(model_files.TRAINING_STATE) == {OPTIMIZER_FILE, CHECKPOINT_DIR}
