"""Content-chained cache keys of stage outputs: when a finished stage may be skipped.

A finished stage's manifest records `files`, the size and SHA-256 of every file it wrote, and `key`, a digest of
its stage name, code version, config hash and the *identity* of each input: the input manifest's own key and
its files' digests (`identity`). Inputs are named by what they hold, not by where they are, so

* a change anywhere (a config section, an input's content) gives a new key to the stage it reaches and so to
  every stage downstream of it, and to nothing upstream;
* an upstream stage that reran into the same URI with other results makes every downstream stage stale;
* the same input reached by an absolute or a relative path, or after a move, is the same input.

`completed` accepts a manifest only when its key is the one the current inputs and config give and its files are
still what was written (size and digest; files a retention prune removed, `pruned` in the manifest, excepted).
"""

from __future__ import annotations

import hashlib
import json
import posixpath

from arborl.components.artifacts import manifests, storage

KEY_VERSION = 1  # bump when what a key covers changes: every earlier manifest is then stale
SKIPPED_DIRS = ("_checkpoints",)  # a train stage's in-stage checkpoints: resume state, not its result
_CHUNK = 1 << 20


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(out_uri: str) -> dict[str, dict]:
    """{relative path: {"size": bytes, "sha256": hex}} of every file of a stage output, without its manifest,
    marker, lock and in-stage checkpoints."""
    fs, path = storage.filesystem(out_uri)
    root = path.rstrip("/")
    out = {}
    for name, info in sorted(fs.find(root, detail=True).items()):
        rel = posixpath.relpath(name, root)
        parts = rel.split("/")
        if rel in (manifests.MANIFEST, manifests.MARKER) or parts[-1].startswith(storage.LOCK_FILE) \
                or any(p in SKIPPED_DIRS for p in parts):
            continue
        out[rel] = {"size": int(info["size"]), "sha256": _sha256(fs, name)}
    return out


def identity(manifest: dict) -> str:
    """What a finished output is, for the stages that read it: its own key and its files' digests."""
    body = {"key": manifest.get("key"), "files": manifest.get("files")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def stage_key(stage: str, config_hash: str, inputs: dict[str, str]) -> str | None:
    """The key of `stage` run with this config hash on these inputs; None while an input has no manifest."""
    ids = {}
    for name, uri in sorted(inputs.items()):
        manifest = manifests.read_manifest(uri)
        if manifest is None:
            return None
        ids[name] = identity(manifest)
    body = {"version": KEY_VERSION, "stage": stage, "code_version": manifests.CODE_VERSION,
            "config_hash": config_hash, "inputs": ids}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def changed_file(out_uri: str, manifest: dict) -> str | None:
    """The first recorded file of a finished output that is missing or no longer what was written, else None."""
    recorded = manifest.get("files")
    if not isinstance(recorded, dict):
        return "(no file digests in the manifest)"
    pruned = bool(manifest.get("pruned"))
    fs, path = storage.filesystem(out_uri)
    for rel, meta in sorted(recorded.items()):
        name = posixpath.join(path.rstrip("/"), rel)
        if not fs.exists(name):
            if pruned:  # a retention prune deleted it on purpose; the manifest says so
                continue
            return f"{rel} (missing)"
        if int(fs.info(name)["size"]) != meta["size"] or _sha256(fs, name) != meta["sha256"]:
            return f"{rel} (changed since it was written)"
    return None


def check_inputs(stage: str, inputs: dict[str, str]) -> None:
    """Refuse to start `stage` (before its output is touched) when an input is unfinished or its weights were
    pruned by `run.keep_iterations`: that run can no longer produce this stage's result from it."""
    for name, uri in inputs.items():
        manifest = manifests.read_manifest(uri)
        if manifest is None:
            raise FileNotFoundError(f"stage {stage!r}: input {name!r} at {uri} is missing or incomplete (no manifest)")
        pruned = manifest.get("pruned")
        if isinstance(pruned, dict) and pruned.get("weights"):
            raise FileNotFoundError(
                f"stage {stage!r}: input {name!r} at {uri} had its weights pruned (run.keep_iterations="
                f"{pruned.get('keep_iterations')}); nothing was changed. Resume with the config that made this run, "
                "or start a new run.name")


def completed(out_uri: str, *, stage: str, inputs: dict[str, str], config_hash: str) -> dict | None:
    """The manifest of a finished `stage` at `out_uri` when it is the output these inputs and this config give
    (same key) and its files are intact; else None, and the stage must run again."""
    manifest = manifests.read_manifest(out_uri)
    if manifest is None or manifest.get("stage") != stage:
        return None
    key = stage_key(stage, config_hash, inputs)
    if key is None or manifest.get("key") != key:
        return None
    if changed_file(out_uri, manifest) is not None:
        return None
    return manifest
