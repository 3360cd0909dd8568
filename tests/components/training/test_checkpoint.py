"""components.training.checkpoint: atomic round trips, RNG streams, half and corrupt checkpoints ignored, and no
checkpoint or optimizer file can run code when loaded."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from arborl.components.artifacts import storage
from arborl.components.artifacts.storage import ArtifactError
from arborl.components.stages.train import OPTIMIZER_FILE, _carry_optimizer_state
from arborl.components.training.checkpoint import (
    LEGACY_FILE,
    META_FILE,
    STATE_FILE,
    TENSORS_FILE,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_dir,
)
from arborl.components.training.training_state import (
    master_weights,
    read_training_state,
    restore_master,
    write_training_state,
)


def _model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _step(model, opt, sched):
    x = torch.randn(5, 6)  # draws from the global torch stream, so RNG restoration matters
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    sched.step()


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_round_trip_restores_state_and_rng_streams(tmp_path):
    root = str(tmp_path / "ckpt")
    model, opt, sched = _model_and_opt()
    for _ in range(3):
        _step(model, opt, sched)
    save_checkpoint(root, 3, model=model, optimizer=opt, scheduler=sched, extra={"epoch": 1}, fingerprint="f")
    expected_draws = _draws()
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    ref_opt.load_state_dict(opt.state_dict())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    ref_sched.load_state_dict(sched.state_dict())
    torch.manual_seed(123)
    _step(reference, ref_opt, ref_sched)  # the uninterrupted continuation (reseed: fresh draws after save)

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a fresh process would have other streams
    fresh, fresh_opt, fresh_sched = _model_and_opt(seed=7)
    uri = latest_checkpoint(root, "f")
    assert uri == step_dir(root, 3)
    info = load_checkpoint(uri, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, fingerprint="f")
    assert info == {"step": 3, "extra": {"epoch": 1}}
    assert _draws() == expected_draws
    assert fresh_sched.get_last_lr() == sched.get_last_lr()
    torch.manual_seed(123)
    _step(fresh, fresh_opt, fresh_sched)
    for a, b in zip(fresh.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_half_and_corrupt_checkpoints_are_skipped_with_a_log(tmp_path, caplog):
    root = str(tmp_path / "ckpt")
    model, opt, sched = _model_and_opt()
    save_checkpoint(root, 2, model=model, optimizer=opt, keep=5)
    save_checkpoint(root, 4, model=model, optimizer=opt, keep=5)
    save_checkpoint(root, 6, model=model, optimizer=opt, keep=5)
    (tmp_path / "ckpt" / "step-00000006" / META_FILE).unlink()  # killed before the manifest
    state = tmp_path / "ckpt" / "step-00000004" / STATE_FILE
    state.write_bytes(state.read_bytes()[:-10])  # truncated copy
    with caplog.at_level(logging.WARNING, logger="arborl.components.training.checkpoint"):
        assert latest_checkpoint(root) == step_dir(root, 2)
    text = caplog.text
    assert "step-00000006" in text and "half-written" in text
    assert "step-00000004" in text and "corrupt" in text


def test_other_fingerprint_is_not_resumed(tmp_path, caplog):
    root = str(tmp_path / "ckpt")
    model, opt, _ = _model_and_opt()
    save_checkpoint(root, 1, model=model, optimizer=opt, fingerprint="old")
    with caplog.at_level(logging.WARNING, logger="arborl.components.training.checkpoint"):
        assert latest_checkpoint(root, "new") is None
    assert "other inputs or settings" in caplog.text
    assert latest_checkpoint(str(tmp_path / "nothing-here")) is None


def test_keeps_the_newest_complete_checkpoints(tmp_path):
    root = str(tmp_path / "ckpt")
    model, opt, _ = _model_and_opt()
    for step in (1, 2, 3, 4):
        save_checkpoint(root, step, model=model, optimizer=opt, keep=2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000003", "step-00000004"]
    assert not list((tmp_path / "ckpt").rglob(".tmp-*"))  # atomic writes leave no temporaries


# --- nothing in a checkpoint or optimizer file runs code ------------------------------------------------


class _Payload:
    """Unpickling this runs `exec`, which writes the marker file: proof that a loader executed the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _pickle_bytes(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"step": 5, "model": _Payload(marker)}, buffer)  # the older layout: torch.save of everything
    return buffer.getvalue()


def _digest(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _refused(root: str, uri: str, fingerprint: str, caplog) -> tuple[str, str]:
    """The warning of `latest_checkpoint` and the error of `load_checkpoint` for the planted `uri`."""
    model, opt, sched = _model_and_opt()
    with caplog.at_level(logging.WARNING, logger="arborl.components.training.checkpoint"):
        assert latest_checkpoint(root, fingerprint) is None
    warning = caplog.text
    with pytest.raises(ArtifactError) as err:
        load_checkpoint(uri, model=model, optimizer=opt, scheduler=sched, fingerprint=fingerprint)
    return warning, str(err.value)


def test_planted_pickle_in_the_old_layout_is_never_loaded(tmp_path, caplog):
    root, marker = str(tmp_path / "ckpt"), tmp_path / "marker"
    uri = step_dir(root, 5)
    data = _pickle_bytes(marker)
    storage.write_bytes(storage.join(uri, LEGACY_FILE), data)
    storage.write_json(storage.join(uri, META_FILE), {"step": 5, "fingerprint": "f", **_digest(data)})
    warning, error = _refused(root, uri, "f", caplog)
    assert storage.join(uri, LEGACY_FILE) in warning and "pickled" in warning
    assert uri in error
    assert not marker.exists()


@pytest.mark.parametrize("planted", [TENSORS_FILE, STATE_FILE])
def test_planted_pickle_under_the_checkpoint_file_names_is_never_loaded(tmp_path, caplog, planted):
    root, marker = str(tmp_path / "ckpt"), tmp_path / "marker"
    model, opt, _ = _model_and_opt()
    uri = save_checkpoint(root, 5, model=model, optimizer=opt, fingerprint="f")
    data = _pickle_bytes(marker) if planted == TENSORS_FILE else pickle.dumps({"step": _Payload(marker)})
    storage.write_bytes(storage.join(uri, planted), data)
    meta = storage.read_json(storage.join(uri, META_FILE))
    meta["files"][planted] = _digest(data)  # digests an attacker can compute: they match
    storage.write_json(storage.join(uri, META_FILE), meta)
    warning, error = _refused(root, uri, "f", caplog)
    assert storage.join(uri, planted) in warning
    assert "not a safetensors file" in warning if planted == TENSORS_FILE else "not JSON" in warning
    assert uri in error
    assert not marker.exists()


def test_state_is_stored_as_safetensors_and_json_only(tmp_path):
    root = str(tmp_path / "ckpt")
    model, opt, sched = _model_and_opt()
    _step(model, opt, sched)
    uri = save_checkpoint(root, 1, model=model, optimizer=opt, scheduler=sched, extra={"history": {"loss": [0.5]}})
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step-00000001").iterdir()) == [
        META_FILE, STATE_FILE, TENSORS_FILE]
    tensors = load_file(str(tmp_path / "ckpt" / "step-00000001" / TENSORS_FILE))
    assert torch.equal(tensors["model/0.weight"], model[0].weight)
    assert torch.equal(tensors["optimizer/state/0/exp_avg"], opt.state[model[0].weight]["exp_avg"])
    assert tensors["rng/torch"].dtype == torch.uint8
    state = json.loads((tmp_path / "ckpt" / "step-00000001" / STATE_FILE).read_text())
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-2
    assert state["rng"]["python"]["__tuple__"][0] == 3
    assert state["extra"] == {"history": {"loss": [0.5]}}
    meta = storage.read_json(storage.join(uri, META_FILE))
    assert set(meta["files"]) == {TENSORS_FILE, STATE_FILE} and meta["step"] == 1


def test_tied_weights_are_stored_once_and_restored_to_both_names(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    uri = save_checkpoint(str(tmp_path / "ckpt"), 1, model=model, optimizer=opt)
    assert set(load_file(str(tmp_path / "ckpt" / "step-00000001" / TENSORS_FILE))) == {"model/0.weight", "rng/torch"}
    fresh = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    fresh[1].weight = fresh[0].weight
    load_checkpoint(uri, model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert torch.equal(fresh[0].weight, model[0].weight) and torch.equal(fresh[1].weight, model[0].weight)


def test_unstorable_extra_is_refused_when_saving(tmp_path):
    model, opt, _ = _model_and_opt()
    with pytest.raises(TypeError, match="extra/hook"):
        save_checkpoint(str(tmp_path / "ckpt"), 1, model=model, optimizer=opt, extra={"hook": print})


def test_planted_pickle_as_optimizer_state_is_refused(tmp_path):
    marker, model_dir = tmp_path / "marker", tmp_path / "model"
    model, opt, sched = _model_and_opt()
    _step(model, opt, sched)
    storage.write_bytes(str(model_dir / OPTIMIZER_FILE), _pickle_bytes(marker))
    with pytest.raises(ArtifactError) as err:
        read_training_state(str(model_dir))
    assert str(model_dir / OPTIMIZER_FILE) in str(err.value) and "exec" in str(err.value)
    assert not marker.exists()

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # what a train stage wrote before master weights: loads with weights_only
    storage.write_bytes(str(model_dir / OPTIMIZER_FILE), buffer.getvalue())
    fresh, fresh_opt, _ = _model_and_opt(seed=3)
    state = read_training_state(str(model_dir))
    assert state is not None and state.master is None
    _carry_optimizer_state(fresh_opt, str(model_dir), state, 0.5)
    assert torch.equal(fresh_opt.state[fresh[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])
    assert fresh_opt.param_groups[0]["lr"] == 0.5


# --- the training state next to a saved model (master weights for train.save_dtype) -----------------------


def test_master_weights_are_kept_only_when_the_save_dtype_rounds(tiny_model):
    named = dict(tiny_model.named_parameters(remove_duplicate=False))
    assert master_weights(named, "float32") is None  # the saved float32 model is exact
    master = master_weights(named, "bfloat16")
    assert master is not None and set(master) == set(named)
    assert master["lm_head.weight"].data_ptr() == master["model.embed_tokens.weight"].data_ptr()  # tied: one tensor
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.copy_(p.to(torch.bfloat16))  # weights a bfloat16 save keeps exactly
    assert master_weights(dict(tiny_model.named_parameters()), "bfloat16") is None


def test_training_state_round_trip_restores_master_weights(tiny_model, tmp_path):
    opt = torch.optim.Adam(tiny_model.parameters(), lr=1e-3)
    tiny_model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    master = master_weights(dict(tiny_model.named_parameters(remove_duplicate=False)), "bfloat16")
    write_training_state(str(tmp_path), opt.state_dict(), master)
    state = read_training_state(str(tmp_path))
    assert state is not None and state.optimizer is not None and set(state.master) == set(master)

    fresh = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.copy_(p.to(torch.bfloat16))  # what loading the bfloat16 save gives
    assert any(not torch.equal(a, b) for a, b in zip(fresh.parameters(), tiny_model.parameters(), strict=True))
    restore_master(fresh, state.master, str(tmp_path / OPTIMIZER_FILE))
    for a, b in zip(fresh.parameters(), tiny_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight

    write_training_state(str(tmp_path / "none"), None, None)  # nothing to keep: no file
    assert read_training_state(str(tmp_path / "none")) is None


def test_master_weights_go_into_the_base_of_a_lora_model_and_must_fit(tiny_model, tmp_path):
    from arborl.components.config import LoraSettings
    from arborl.components.training.lora import wrap

    master = {k: v.clone() + 1.0 for k, v in tiny_model.named_parameters(remove_duplicate=False)}
    wrapped = wrap(copy.deepcopy(tiny_model), LoraSettings(enabled=True, rank=2, target_modules=["q_proj"]))
    restore_master(wrapped.get_base_model(), master, "m/optimizer.pt")
    base = dict(wrapped.get_base_model().named_parameters())
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(base[f"{q}.base_layer.weight"], master[f"{q}.weight"])
    assert not torch.equal(base[f"{q}.lora_B.default.weight"], master[f"{q}.weight"][:, :2])  # adapters untouched
    del master["model.norm.weight"]
    with pytest.raises(ArtifactError, match=r"m/optimizer.pt: its master weights lack 1 parameters.*model.norm"):
        restore_master(tiny_model, master, "m/optimizer.pt")
