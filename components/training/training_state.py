"""The training state next to a finished model directory: the optimizer state and full-precision master weights.

Next to a finished model directory lies its training state, `optimizer.pt` (`write_training_state`): the Adam
state a following train stage continues, and, when the model was saved in a narrower dtype than it was trained
in (`train.save_dtype`), the full-precision master weights that stage starts from instead of the rounded copy.
It is a `torch.save` file of tensors and plain values, read with `weights_only` so it cannot run code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from arborl.components.artifacts import storage
from arborl.components.artifacts.model_files import TRAINING_STATE_FILE
from arborl.components.artifacts.storage import ArtifactError

_STATE_FORMAT = "arborl.training_state"


@dataclass
class TrainingState:
    """What continues training from a saved model: the optimizer's state dict (None: fresh moments) and the
    full-precision master weights by parameter name (None: the saved weights are exact)."""

    optimizer: dict[str, Any] | None
    master: dict[str, torch.Tensor] | None


def master_weights(named: dict[str, torch.Tensor], save_dtype: str) -> dict[str, torch.Tensor] | None:
    """The floating-point tensors of `named` (parameter name → tensor) when saving them in `save_dtype` rounds
    at least one of them, else None: then the saved model itself is the exact starting point."""
    target = getattr(torch, save_dtype)
    floats = {name: t.detach() for name, t in named.items() if t.is_floating_point()}
    for t in floats.values():
        if t.dtype != target and not torch.equal(t.to(target).to(t.dtype), t):
            return floats
    return None


def write_training_state(model_uri: str, optimizer: dict[str, Any] | None,
                         master: dict[str, torch.Tensor] | None) -> None:
    """Write the training state of the model directory `model_uri` (atomically); nothing when both are None."""
    if optimizer is None and master is None:
        return
    data = io.BytesIO()
    torch.save({"format": _STATE_FORMAT, "version": 1, "optimizer": optimizer, "master": master}, data)
    storage.write_bytes(storage.join(model_uri, TRAINING_STATE_FILE), data.getvalue())


def read_training_state(model_uri: str, map_location: str | torch.device = "cpu") -> TrainingState | None:
    """The training state of the model directory `model_uri`, or None when it has none. A plain optimizer state
    dict (the older layout) is read as the optimizer part. Anything but tensors and plain values is refused."""
    uri = storage.join(model_uri, TRAINING_STATE_FILE)
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    try:  # weights_only: tensors and plain containers only, so a planted pickle cannot run code
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        text = str(exc)
        refused = [line.strip() for line in text.splitlines() if "unsupported" in line.lower()]
        reason = refused[0] if refused else f"{type(exc).__name__}: {text.splitlines()[0] if text else 'empty'}"
        raise ArtifactError(f"{uri}: not a training state of tensors and plain values ({reason})") from exc
    if not isinstance(state, dict):
        raise ArtifactError(f"{uri}: not a training state (a {type(state).__name__}, not a dict)")
    if state.get("format") != _STATE_FORMAT:
        return TrainingState(state, None)
    optimizer, master = state.get("optimizer"), state.get("master")
    if optimizer is not None and not isinstance(optimizer, dict):
        raise ArtifactError(f"{uri}: its optimizer state is a {type(optimizer).__name__}, not a dict")
    if master is not None and not (isinstance(master, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in master.items())):
        raise ArtifactError(f"{uri}: its master weights are not a dict of parameter names to tensors")
    return TrainingState(optimizer, master)


def restore_master(module: torch.nn.Module, master: dict[str, torch.Tensor], uri: str) -> None:
    """Copy the master weights `master` (read from `uri`) into the parameters of `module`, in place. The base
    weights of a LoRA-wrapped model (`….base_layer.weight`) take the plain model's names; adapters are left as
    they are."""
    params = {name.replace(".base_layer.", "."): p for name, p in module.named_parameters(remove_duplicate=False)
              if "lora_" not in name and p.is_floating_point()}
    missing = sorted(set(params) - set(master))
    if missing:
        raise ArtifactError(f"{uri}: its master weights lack {len(missing)} parameters of the model "
                            f"(e.g. {missing[0]!r}); they belong to another model")
    wrong = [name for name, p in params.items() if tuple(master[name].shape) != tuple(p.shape)]
    if wrong:
        raise ArtifactError(f"{uri}: master weight {wrong[0]!r} has shape {tuple(master[wrong[0]].shape)}, the model's "
                            f"is {tuple(params[wrong[0]].shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(master[name])
