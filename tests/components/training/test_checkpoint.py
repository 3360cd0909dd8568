"""components.training.checkpoint: atomic round trips, RNG streams, half and corrupt checkpoints ignored."""

from __future__ import annotations

import copy
import logging
import random

import numpy as np
import torch

from arborl.components.training.checkpoint import (
    META_FILE,
    STATE_FILE,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_dir,
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
