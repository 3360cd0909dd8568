"""components.stages.warmstart with `warmstart.enabled` false: `model.path` becomes the run's iteration-0 model,
untrained, without reading the world; the config requires `model.path` then."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arborl.components.artifacts import manifests
from arborl.components.config import ConfigError, load_config
from arborl.components.stages import warmstart
from arborl.components.training import training_state
from arborl.components.training.models import load_policy, save_policy

ROOT = Path(__file__).resolve().parents[3]
MICRO = ROOT / "configs" / "micro.yaml"


@pytest.fixture
def given(tiny_model, tokenizer, tmp_path) -> Path:
    path = tmp_path / "given"
    save_policy(tiny_model, tokenizer, str(path))
    return path


@pytest.fixture
def no_world(tmp_path) -> str:
    """A finished prepare output without any of its files: a stage that read the world would fail."""
    uri = str(tmp_path / "world")
    manifests.write_manifest(uri, stage="prepare", inputs={}, config_hash="none", outputs={}, metrics={},
                           started=time.time())
    return uri


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_disabled_warm_start_saves_model_path_as_the_start_model(given, no_world, tmp_path, save_dtype):
    cfg = load_config(MICRO, ["warmstart.enabled=false", f"model.path={given}", f"train.save_dtype={save_dtype}"])
    out = tmp_path / "warmstart"
    result = warmstart.run(cfg, {"world": no_world}, str(out))
    assert result.outputs == {"model": str(out)} and not result.skipped
    assert result.metrics["trained"] == 0 and result.metrics["steps"] == 0 and result.metrics["demos"] == 0
    assert result.metrics["source"] == str(given)
    source, saved = load_file(str(given / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert source.keys() == saved.keys()
    for k, v in source.items():
        assert torch.equal(saved[k], v.to(getattr(torch, save_dtype))), k
    state = training_state.read_training_state(str(out))
    if save_dtype == "float32":
        assert state is None  # the saved copy is exact
    else:  # rounded: the next iteration starts from the full-precision weights
        assert state.optimizer is None and all(torch.equal(state.master[k], v) for k, v in source.items())
    model, tokenizer = load_policy(str(out))
    assert len(tokenizer) == result.metrics["vocab_size"]
    assert warmstart.run(cfg, {"world": no_world}, str(out)).skipped


def test_disabled_warm_start_needs_model_path():
    with pytest.raises(ConfigError) as err:
        load_config(MICRO, ["warmstart.enabled=false"])
    assert "warmstart.enabled" in str(err.value) and "model.path" in str(err.value)
    assert str(MICRO) in str(err.value)


def test_gold_chain_unit_needs_the_synthetic_world_and_its_built_model(given, no_world):
    cfg = load_config(MICRO, [f"model.path={given}", "warmstart.enabled=false"])
    with pytest.raises(ValueError, match="chain_unit 'gold' needs the synthetic world"):
        warmstart.gold_chain_unit(cfg, no_world)
