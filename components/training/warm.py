"""The policy kept warm in memory between the stages of one process (`orchestration.executor: inprocess`).

Every stage still writes its artifacts, so lineage, resume and the other executors are unchanged; within one
process the next stage takes the model a stage just wrote from here instead of reading it back: sample(i+1),
evaluate(i+1) and train(i+1) after train(i), and everything after the warm start. An entry is valid while the
weights file it was made with is the one on disk (same size and modification time): a file rewritten by another
process is read from disk again. (A replay keeps the models of pruned iterations it rebuilds, with no file.)

An entry also holds the training state that train(i+1) continues from (Adam moments, full-precision master
weights). With `train.checkpoint_every` > 1 that state is written to disk only every k-th iteration: here it
lives in memory, and after a restart the train stage rebuilds it by replaying the updates since the last full
checkpoint (components/stages/train.py).

Callers get copies: a model taken from here is trained or moved without touching the entry.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arborl.components.artifacts import storage

MAX_ENTRIES = 2  # the newest policy and the one before it (the warm start while the KL reference needs it)
ENABLED = {"on": False}  # set for the length of an in-process run (`kept`); off, nothing is kept
LOADS: Counter[str] = Counter()  # "disk" / "warm": model loads by where they came from (tests, `bench iteration`)


@dataclass
class WarmModel:
    """A model directory's contents in memory: the model as `models.load_policy` would return it (weights as
    saved), its tokenizer and its training state (None: none kept), stamped with its weights file."""

    stamp: tuple
    model: torch.nn.Module
    tokenizer: Any
    state: Any = None


_entries: OrderedDict[str, WarmModel] = OrderedDict()


def _key(uri: str) -> str | None:
    return os.path.normpath(storage.filesystem(uri)[1]) if storage.is_local(uri) else None


def _stamp(uri: str) -> tuple | None:
    """(name, size, mtime_ns) of each weights file (`*.safetensors`) of the local model directory `uri`; an
    empty tuple when there are none (pruned by run.keep_iterations: a replay keeps such a model, and it is never
    on disk again)."""
    key = _key(uri)
    if key is None:
        return None
    stamp = []
    for path in sorted(Path(key).glob("*.safetensors")):
        try:
            st = path.stat()
        except OSError:
            continue
        stamp.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def remember(uri: str, model: torch.nn.Module, tokenizer: Any, state: Any = None) -> None:
    """Keep `model` (holding the weights exactly as written to the local model directory `uri`, in the dtype
    `load_policy` gives) with its tokenizer and training state. The entry takes ownership of `model` and `state`:
    the caller must not change them afterwards. Remote URIs are not kept."""
    key, stamp = _key(uri), _stamp(uri)
    if not ENABLED["on"] or key is None or stamp is None:
        return
    _entries.pop(key, None)
    _entries[key] = WarmModel(stamp, model.eval(), tokenizer, state)
    while len(_entries) > MAX_ENTRIES:
        _entries.popitem(last=False)


def keep_trained(uri: str, model: torch.nn.Module, tokenizer: Any, optimizer: dict[str, Any] | None,
                 master: dict[str, torch.Tensor] | None, save_dtype: str) -> None:
    """Keep a model just trained and saved to `uri` in `save_dtype`, with the training state it continues from
    (the optimizer state dict, the full-precision master weights or None). `model` is rounded in place to the
    saved weights and handed over: the caller must not use it afterwards."""
    from arborl.components.training.training_state import TrainingState

    if master is not None:  # views of the weights rounded below
        master = {k: v.detach().clone() for k, v in master.items()}
    round_to_saved(model, save_dtype)
    remember(uri, model, tokenizer, TrainingState(optimizer, master))


def round_to_saved(model: torch.nn.Module, save_dtype: str) -> None:
    """Round the model's floating-point weights, in place, to what saving them in `save_dtype` keeps, and make
    it what `load_policy` returns (no activation checkpointing): the model as the next stage reads it."""
    target = getattr(torch, save_dtype)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point() and t.dtype != target:
                t.copy_(t.to(target))
    if getattr(model, "supports_gradient_checkpointing", False):
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def _get(uri: str) -> WarmModel | None:
    key = _key(uri)
    entry = _entries.get(key) if key is not None else None
    if entry is None:
        return None
    if _stamp(uri) != entry.stamp:  # rewritten or deleted since: the disk is the truth
        del _entries[key]
        return None
    _entries.move_to_end(key)
    return entry


def model(uri: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, Any] | None:
    """A copy of the kept model of `uri` on `device` in `dtype` and its tokenizer, or None when none is kept."""
    entry = _get(uri)
    if entry is None:
        return None
    copied = copy.deepcopy(entry.model)
    if any(p.dtype != dtype for p in copied.parameters() if p.is_floating_point()):
        copied = copied.to(dtype)
    LOADS["warm"] += 1
    return copied.to(device), entry.tokenizer


def training_state(uri: str) -> Any:
    """A copy of the training state kept with `uri`, or None."""
    entry = _get(uri)
    return None if entry is None or entry.state is None else copy.deepcopy(entry.state)


def has_state(uri: str) -> bool:
    entry = _get(uri)
    return entry is not None and entry.state is not None


@contextlib.contextmanager
def kept(enabled: bool) -> Iterator[None]:
    """Keep models in memory for the length of the block when `enabled` (an in-process run); forget them after."""
    saved = ENABLED["on"]
    ENABLED["on"] = enabled
    try:
        yield
    finally:
        ENABLED["on"] = saved
        clear()


def forget(uri: str) -> None:
    key = _key(uri)
    if key is not None:
        _entries.pop(key, None)


def clear() -> None:
    """Forget every kept model (tests; a process that starts another run)."""
    _entries.clear()
