"""Checkpoints inside a train stage: model, optimizer, scheduler, RNG streams and counters, written atomically.

Layout under a checkpoint root (any URI):

    step-00000012/tensors.safetensors   every tensor: model weights, optimizer moments, torch CPU/CUDA RNG states
    step-00000012/state.json            everything else: optimizer param groups and step counts, scheduler state,
                                        Python and NumPy RNG states, the caller's counters; tensors by name
    step-00000012/checkpoint.json       written last: format, step, fingerprint, size and sha256 of both files

Nothing is pickled: reading a checkpoint parses safetensors and JSON only, so a file planted under the output
root cannot run code. A directory in the older pickled layout (`state.pt`) is skipped with a warning.

A directory without `checkpoint.json`, or whose files do not match the recorded sizes and digests, is a half
checkpoint (a kill between the writes, a truncated copy): it is skipped with a warning and never loaded. A
checkpoint whose fingerprint differs from the caller's (other inputs or settings) is skipped too. Only the
newest `keep` complete checkpoints stay.

The training state that continues a finished model (optimizer state, master weights) is in training_state.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from typing import Any

import numpy as np
import safetensors.torch
import torch

from arborl.components.artifacts import storage
from arborl.components.artifacts.storage import ArtifactError

log = logging.getLogger(__name__)

FORMAT = 2
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
META_FILE = "checkpoint.json"
LEGACY_FILE = "state.pt"  # the older pickled layout: never read
FILES = (TENSORS_FILE, STATE_FILE)
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")
_RNG_PREFIX = "rng/"


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


# --- pickle-free encoding: tensors into a safetensors dict, the rest into JSON ----------------------------


class _Encoder:
    """Turns nested state (dicts, lists, tuples, numbers, strings, NumPy arrays, tensors) into JSON, moving
    each tensor into `tensors` under its path and leaving {"__tensor__": path} in its place."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, str] = {}  # the same tensor under two names (tied weights): stored once
        self._storages: set[int] = set()

    def encode(self, obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self._tensor(obj, path)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biuf":
                raise TypeError(f"checkpoint: {path} is a NumPy array of {obj.dtype}, not storable")
            return {"__ndarray__": {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}}
        if isinstance(obj, np.generic):
            return self.encode(obj.item(), path)
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            plain = all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS)
            if plain:
                return {k: self.encode(v, f"{path}/{k}") for k, v in obj.items()}
            return {"__dict__": [[self.encode(k, f"{path}/key"), self.encode(v, f"{path}/{k}")]
                                 for k, v in obj.items()]}
        raise TypeError(f"checkpoint: {path} is a {type(obj).__name__}, not storable (tensors, arrays, numbers, "
                        "strings, lists, tuples and dicts only)")

    def _tensor(self, tensor: torch.Tensor, path: str) -> str:
        tensor = tensor.detach()
        view = None
        if tensor.numel() > 0:
            view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                    tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
            if view in self._views:
                return self._views[view]
        if path in self.tensors:
            raise ValueError(f"checkpoint: two tensors named {path!r}")
        stored = tensor.to("cpu").contiguous()
        if stored.numel() > 0:
            pointer = stored.untyped_storage().data_ptr()
            if pointer in self._storages:  # another view of a stored tensor: safetensors wants its own copy
                stored = stored.clone()
                pointer = stored.untyped_storage().data_ptr()
            self._storages.add(pointer)
        self.tensors[path] = stored
        if view is not None:
            self._views[view] = path
        return path


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and next(iter(obj)) in _TAGS:
        ((tag, value),) = obj.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise ValueError(f"refers to a tensor {value!r} that is not stored")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__dict__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"holds a NumPy array of {dtype}, not a number type")
        return np.asarray(value["data"], dtype=dtype).reshape(value["shape"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _safetensors_problem(data: bytes) -> str | None:
    """Why `data` is not a well-formed safetensors file (header and data extent), or None."""
    if len(data) < 8:
        return "shorter than a safetensors header"
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        return "not a safetensors file (its header length runs past the end of the file)"
    try:
        header = json.loads(data[8:8 + size])
    except ValueError:
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"not a safetensors file (entry {name!r} has no data offsets)"
        end = max(end, offsets[1])
    if 8 + size + end != len(data):
        return "truncated or padded safetensors file (its data does not match its header)"
    return None


# --- directories -----------------------------------------------------------------------------------------


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


def _digest(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


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

    `model` is the bare module (unwrap DDP first); `extra` holds the caller's counters: numbers, strings,
    lists, tuples, dicts, NumPy arrays and tensors.
    """
    encoder = _Encoder()
    state = {
        "step": step,
        "model": encoder.encode(model.state_dict(), "model"),
        "optimizer": encoder.encode(optimizer.state_dict(), "optimizer"),
        "scheduler": encoder.encode(scheduler.state_dict(), "scheduler") if scheduler is not None else None,
        "rng": encoder.encode(capture_rng(), _RNG_PREFIX.rstrip("/")),
        "extra": encoder.encode(extra or {}, "extra"),
    }
    blobs = {
        TENSORS_FILE: safetensors.torch.save(encoder.tensors, metadata={"format": str(FORMAT)}),
        STATE_FILE: json.dumps(state, sort_keys=True).encode(),
    }
    uri = step_dir(root, step)
    for name, data in blobs.items():
        storage.write_bytes(storage.join(uri, name), data)
    meta = {"format": FORMAT, "step": step, "fingerprint": fingerprint,
            "files": {name: _digest(data) for name, data in blobs.items()}}
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


def _valid(uri: str, fingerprint: str) -> tuple[dict, bytes, Any] | None:
    """(meta, tensors file bytes, parsed state.json) of a complete, well-formed checkpoint with this
    fingerprint, else None with a warning naming what is wrong."""
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri):
        log.warning("checkpoint %s: no %s (half-written), skipped", uri, META_FILE)
        return None
    try:
        meta = storage.read_json(meta_uri)
    except (OSError, ValueError) as exc:
        log.warning("checkpoint %s: unreadable (%s), skipped", uri, exc)
        return None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or any(not isinstance(files.get(name), dict) for name in FILES):
        if storage.exists(storage.join(uri, LEGACY_FILE)) or (isinstance(meta, dict) and "sha256" in meta):
            log.warning("checkpoint %s: %s is in the older pickled layout, which is never loaded; skipped",
                        uri, storage.join(uri, LEGACY_FILE))
        else:
            log.warning("checkpoint %s: %s does not list %s, skipped", uri, meta_uri, " and ".join(FILES))
        return None
    blobs = {}
    for name in FILES:
        file_uri = storage.join(uri, name)
        try:
            data = storage.read_bytes(file_uri)
        except OSError as exc:
            log.warning("checkpoint %s: %s unreadable (%s), skipped", uri, file_uri, exc)
            return None
        if _digest(data) != {"size": files[name].get("size"), "sha256": files[name].get("sha256")}:
            log.warning("checkpoint %s: %s does not match its recorded size/sha256 (corrupt), skipped",
                        uri, file_uri)
            return None
        blobs[name] = data
    if meta.get("fingerprint") != fingerprint:
        log.warning("checkpoint %s: made with other inputs or settings (fingerprint %s, now %s), skipped",
                    uri, meta.get("fingerprint"), fingerprint)
        return None
    problem = _safetensors_problem(blobs[TENSORS_FILE])
    if problem:
        log.warning("checkpoint %s: %s is %s, skipped", uri, storage.join(uri, TENSORS_FILE), problem)
        return None
    try:
        state = json.loads(blobs[STATE_FILE])
    except (ValueError, RecursionError) as exc:
        log.warning("checkpoint %s: %s is not JSON (%s), skipped", uri, storage.join(uri, STATE_FILE), exc)
        return None
    return meta, blobs[TENSORS_FILE], state


def latest_checkpoint(root: str, fingerprint: str = "") -> str | None:
    """URI of the newest complete, intact checkpoint under `root` made with `fingerprint`, or None."""
    for _, uri in _step_dirs(root):
        if _valid(uri, fingerprint) is not None:
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
    """Restore model, optimizer, scheduler and the global RNG streams from `uri`; returns {"step", "extra"}.

    Model and optimizer tensors are read to `map_location`; RNG states stay on the CPU.
    """
    found = _valid(uri, fingerprint)
    if found is None:
        raise ArtifactError(f"checkpoint {uri} is incomplete, corrupt or from other settings (see the log)")
    _, data, raw = found
    tensors_uri, state_uri = storage.join(uri, TENSORS_FILE), storage.join(uri, STATE_FILE)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error type
        raise ArtifactError(f"{tensors_uri}: not a readable safetensors file: {exc}") from exc
    tensors = {k: v if k.startswith(_RNG_PREFIX) else v.to(map_location) for k, v in tensors.items()}
    try:
        state = _decode(raw, tensors)
        step, rng, extra = int(state["step"]), state["rng"], state["extra"]
        model_state, optimizer_state, scheduler_state = state["model"], state["optimizer"], state["scheduler"]
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{state_uri}: not a checkpoint state ({exc!r})") from exc
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    if scheduler is not None and scheduler_state is not None:
        scheduler.load_state_dict(scheduler_state)
    restore_rng(rng)
    return {"step": step, "extra": extra}
