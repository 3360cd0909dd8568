"""Checkpoints inside a train stage: model, optimizer, scheduler, RNG streams and counters, written atomically.

Layout under a checkpoint root (any URI):

    step-00000012/state.pt          torch.save of everything (written atomically)
    step-00000012/checkpoint.json   written last: step, fingerprint, size and sha256 of state.pt

A directory without `checkpoint.json`, or whose `state.pt` does not match the recorded size and digest, is a
half checkpoint (a kill between the two writes, a truncated copy): it is skipped with a warning and never
loaded. A checkpoint whose fingerprint differs from the caller's (other inputs or settings) is skipped too.
Only the newest `keep` complete checkpoints stay.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import re
from typing import Any

import numpy as np
import torch

from arborl.components import storage

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def capture_rng() -> dict[str, Any]:
    """The global RNG streams: Python `random`, NumPy's legacy global generator, torch CPU (and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: str, step: int) -> str:
    return storage.join(root, f"step-{step:08d}")


def _step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, uri) of every step directory under `root`, newest first."""
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        match = _STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match:
            found.append((int(match.group(1)), step_dir(root, int(match.group(1)))))
    return sorted(found, reverse=True)


def save_checkpoint(
    root: str,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
    fingerprint: str = "",
    keep: int = 2,
) -> str:
    """Write the checkpoint of optimizer step `step` under `root`; returns its URI.

    `model` is the bare module (unwrap DDP first); `extra` holds the caller's counters (picklable).
    """
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng(),
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    uri = step_dir(root, step)
    storage.write_bytes(storage.join(uri, STATE_FILE), data)
    meta = {"step": step, "fingerprint": fingerprint, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.write_json(storage.join(uri, META_FILE), meta)
    _prune(root, keep)
    return uri


def _prune(root: str, keep: int) -> None:
    complete = 0
    for _, uri in _step_dirs(root):
        if complete < keep and storage.exists(storage.join(uri, META_FILE)):
            complete += 1
            continue
        if complete > 0:  # older than a kept complete checkpoint: outdated or half-written
            storage.remove(uri)


def _valid(uri: str, fingerprint: str) -> tuple[dict | None, bytes | None]:
    """(meta, state bytes) of a complete checkpoint with this fingerprint, else (None, None) with a warning."""
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri):
        log.warning("checkpoint %s: no %s (half-written), skipped", uri, META_FILE)
        return None, None
    try:
        meta = storage.read_json(meta_uri)
        data = storage.read_bytes(storage.join(uri, STATE_FILE))
    except (OSError, ValueError) as exc:
        log.warning("checkpoint %s: unreadable (%s), skipped", uri, exc)
        return None, None
    if len(data) != meta.get("size") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        log.warning("checkpoint %s: %s does not match its recorded size/sha256 (corrupt), skipped", uri, STATE_FILE)
        return None, None
    if meta.get("fingerprint") != fingerprint:
        log.warning("checkpoint %s: made with other inputs or settings (fingerprint %s, now %s), skipped",
                    uri, meta.get("fingerprint"), fingerprint)
        return None, None
    return meta, data


def latest_checkpoint(root: str, fingerprint: str = "") -> str | None:
    """URI of the newest complete, intact checkpoint under `root` made with `fingerprint`, or None."""
    for _, uri in _step_dirs(root):
        meta, _ = _valid(uri, fingerprint)
        if meta is not None:
            return uri
    return None


def load_checkpoint(
    uri: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    fingerprint: str = "",
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and the global RNG streams from `uri`; returns {"step", "extra"}."""
    meta, data = _valid(uri, fingerprint)
    if meta is None:
        raise ValueError(f"checkpoint {uri} is incomplete, corrupt or from other settings (see the log)")
    # weights_only=False: the RNG states hold NumPy arrays and Python tuples; these files are the run's own.
    state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
