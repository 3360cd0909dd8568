"""What a run keeps of its iteration models (`run.keep_iterations`).

After RL iteration `latest` completes, `prune` goes over the train outputs of the earlier iterations:

* the model directories of the last K iterations, the protected ones (the warm-start model, every registered
  model: `protect`) and the LoRA base of each of them keep their weights; every other one loses everything but
  its manifest and stage marker;
* every iteration but the newest loses its training state (`optimizer.pt`: Adam moments, master weights), which
  only the next iteration's train stage reads; a LoRA base keeps it (its master weights are the base's);
* when the newest iteration left its training state in memory (`train.checkpoint_every`), the newest iteration
  with one on disk keeps its weights and state: a restart replays the updates after it.

The manifest is marked first (`"pruned": {"weights": ..., "training_state": ..., "at": ..., "keep_iterations":
...}`), atomically, and the files are deleted after: the stage still counts as done (a rerun skips it, its
metrics stay), a reader of pruned weights gets an error naming the directory (`models.check_model_dir`), and a
prune interrupted half-way is finished by the next one. Outputs without a manifest (half-written) are left alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from arborl.components import storage
from arborl.components.training.lora import BASE_FILE
from arborl.components.training.training_state import TRAINING_STATE_FILE

REGISTERED_FILE = "registered_models.json"  # at the run root: {"models": [URIs]} of registered models
PRUNED = "pruned"


def registered(root: str) -> list[str]:
    """The model URIs recorded as registered under the run root `root`."""
    uri = storage.join(root, REGISTERED_FILE)
    if not storage.exists(uri):
        return []
    data = storage.read_json(uri)
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise storage.ArtifactError(f"{uri}: no 'models' list of model URIs in it")
    return models


def protect(root: str, model_uri: str) -> None:
    """Record `model_uri` as registered under the run root `root`: `prune` never deletes it. Call it before
    registering, so a crash in between keeps one model too many rather than losing one."""
    models = registered(root)
    if model_uri not in models:
        storage.write_json(storage.join(root, REGISTERED_FILE), {"models": [*models, model_uri]})


def _lora_base(model_uri: str) -> str | None:
    pointer = storage.join(model_uri, BASE_FILE)
    if not storage.exists(pointer):
        return None
    data = storage.read_json(pointer)
    base = data.get("base") if isinstance(data, dict) else None
    return base if isinstance(base, str) and base else None


def _norm(uri: str) -> str:
    return str(uri).rstrip("/")


def prune(models: dict[int, str], latest: int, keep: int | None, protected: Iterable[str] = ()
          ) -> dict[str, list[str]]:
    """Apply `run.keep_iterations` = `keep` to the iteration models `models` (iteration → train output URI) once
    iteration `latest` is complete; iterations after `latest` (from an earlier, longer run) are not touched.

    Returns the URIs pruned by this call: {"weights": [...], "training_state": [...]}. `keep` None: nothing."""
    done: dict[str, list[str]] = {"weights": [], "training_state": []}
    if keep is None:
        return done
    kept = {_norm(uri) for i, uri in models.items() if latest - keep < i <= latest}
    kept |= {_norm(uri) for uri in protected}
    bases = {_norm(base) for base in map(_lora_base, sorted(kept)) if base}  # a LoRA model needs its base
    kept |= bases
    anchor = _replay_anchor(models, latest)
    if anchor is not None:  # the state a restart replays from (train.checkpoint_every): weights and state stay
        kept.add(_norm(anchor))
        bases.add(_norm(anchor))
    for _, uri in sorted((i, uri) for i, uri in models.items() if i < latest):
        weights, state = _norm(uri) not in kept, _norm(uri) not in bases
        for what, now in zip(("weights", "training_state"), _prune_dir(uri, weights, state, keep), strict=True):
            if now:
                done[what].append(uri)
    return done


def _replay_anchor(models: dict[int, str], latest: int) -> str | None:
    """When iteration `latest` left its training state in memory (train.checkpoint_every), the newest earlier
    iteration model whose training state is on disk: a restart replays the updates after it."""
    newest = [(i, uri) for i, uri in sorted(models.items(), reverse=True) if i <= latest]
    if not newest or storage.exists(storage.join(newest[0][1], TRAINING_STATE_FILE)):
        return None
    return next((uri for _, uri in newest[1:] if storage.exists(storage.join(uri, TRAINING_STATE_FILE))), None)


def _prune_dir(uri: str, weights: bool, training_state: bool, keep: int) -> tuple[bool, bool]:
    """Mark the train output `uri` pruned and delete its weights and/or training state; (weights, training state)
    newly marked by this call."""
    manifest = storage.read_manifest(uri)
    if not isinstance(manifest, dict) or manifest.get("stage") != "train":
        return False, False
    note = manifest.get(PRUNED) if isinstance(manifest.get(PRUNED), dict) else {}
    had = (bool(note.get("weights")), bool(note.get("training_state")))
    want = (weights or had[0], training_state or weights or had[1])
    if not any(want):
        return False, False
    if want != had:
        stamp = {"weights": want[0], "training_state": want[1], "keep_iterations": keep,
                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        storage.write_json(storage.manifest_uri(uri), {**manifest, PRUNED: stamp})
    fs, path = storage.filesystem(uri)
    here = path.rstrip("/")
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if entry.rstrip("/") == here or name in (storage.MANIFEST, storage.MARKER):
            continue
        if want[0] or name in storage.TRAINING_STATE:
            fs.rm(entry, recursive=True)
    return want[0] and not had[0], want[1] and not had[1]
