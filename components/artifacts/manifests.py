"""A stage's output directory: its marker, its manifest, and who owns it.

A stage writes `_stage.json` (its marker) first, its files next and `_manifest.json` last. A directory with
the marker but no manifest is a half artifact: it is wiped before the same stage runs again.

A stage owns only what it created: `prepare_output` refuses (`OutputNotOwned`, nothing deleted) an output
location that is an existing file, holds files of no stage or of another stage, or overlaps the stage's
inputs. When a finished output may be skipped is decided by its content-chained key (`stage_keys.py`).
"""

from __future__ import annotations

import time
from typing import Any

import fsspec

from arborl.components.artifacts.storage import (
    LOCK_FILE,
    exists,
    filesystem,
    join,
    location,
    makedirs,
    read_json,
    within,
    write_json,
)

MANIFEST = "_manifest.json"
MARKER = "_stage.json"  # {"stage": name}: written before any other file of a stage's output
CODE_VERSION = "0.1.0"


class OutputNotOwned(ValueError):
    """A stage's output location holds something the stage did not create, or overlaps one of its inputs.

    Raised before the stage writes or deletes anything."""

    def __init__(self, stage: str, uri: str, reason: str):
        self.stage, self.uri, self.reason = stage, uri, reason
        super().__init__(f"stage {stage!r} will not write its output to {uri}: {reason}. Nothing was deleted; "
                         f"choose a new or empty location, or an earlier output of this stage")

    def __reduce__(self):  # pickled across worker processes
        return type(self), (self.stage, self.uri, self.reason)


def _name(entry: str) -> str:
    return entry.rstrip("/").rsplit("/", 1)[-1]


def _entries(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The entries directly under directory `path` (none when it does not exist), not counting a writer's lock."""
    if not fs.exists(path):
        return []
    here = path.rstrip("/")
    return [e for e in fs.ls(path, detail=False) if e.rstrip("/") != here and not _name(e).startswith(LOCK_FILE)]


def _claimed_by(out_uri: str, file: str) -> str | None:
    """The stage named by the manifest or marker `file` under `out_uri`, or None when it names none."""
    try:
        data = read_json(join(out_uri, file))
    except (OSError, ValueError):
        return None
    stage = data.get("stage") if isinstance(data, dict) else None
    return stage if isinstance(stage, str) else None


def check_output(out_uri: str, *, stage: str, inputs: dict[str, str] | None = None, contents: bool = True) -> None:
    """Refuse (`OutputNotOwned`) an output location that `stage` does not own; reads only, deletes nothing.

    Refused: a location that is, lies inside or contains one of `inputs`; with `contents`, also an existing file
    (on an object store, an object at exactly that key) and a non-empty directory (prefix) whose manifest or
    marker is missing or names another stage. A new or empty location, or one whose manifest and marker both
    (where present) name `stage`, is fine."""
    out = location(out_uri, physical=True)
    for key, uri in (inputs or {}).items():
        where = location(uri, physical=True)
        if out == where:
            raise OutputNotOwned(stage, out_uri, f"it is the stage's input {key!r} ({uri})")
        if within(where, out):
            raise OutputNotOwned(stage, out_uri, f"it lies inside the stage's input {key!r} ({uri})")
        if within(out, where):
            raise OutputNotOwned(stage, out_uri, f"it contains the stage's input {key!r} ({uri})")
    if not contents:
        return
    fs, path = filesystem(out_uri)
    if not fs.exists(path):
        return
    if fs.isfile(path):
        raise OutputNotOwned(stage, out_uri, "it is an existing file")
    if not fs.isdir(path):
        raise OutputNotOwned(stage, out_uri, "it exists and is not a directory")
    names = sorted(_name(e) for e in _entries(fs, path))
    if not names:
        return
    claims = {file: _claimed_by(out_uri, file) for file in (MANIFEST, MARKER) if file in names}
    if not claims:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise OutputNotOwned(stage, out_uri, f"it is a non-empty directory that is no stage's output (no {MANIFEST} "
                                             f"or {MARKER}; it holds {shown})")
    for file, owner in claims.items():
        if owner is None:
            raise OutputNotOwned(stage, out_uri, f"its {file} names no stage")
        if owner != stage:
            raise OutputNotOwned(stage, out_uri, f"it holds an output of stage {owner!r} (its {file})")


# --- manifests -------------------------------------------------------------------------------------


def manifest_uri(out_uri: str) -> str:
    return join(out_uri, MANIFEST)


def read_manifest(out_uri: str) -> dict | None:
    uri = manifest_uri(out_uri)
    if not exists(uri):
        return None
    return read_json(uri)


def prepare_output(out_uri: str, *, stage: str, inputs: dict[str, str] | None = None,
                   keep: tuple[str, ...] = ()) -> None:
    """Make `out_uri` ready for `stage` to write: refuse it (`check_output`) unless it is new, empty or this
    stage's own earlier output; write the stage marker first; then wipe a stale or half-written output except
    the entries named in `keep` (e.g. a train stage's in-stage checkpoints, which a rerun resumes from).

    The marker stays while the rest is removed (the old manifest first), so an interrupted wipe still leaves
    an output this stage recognises as its own."""
    check_output(out_uri, stage=stage, inputs=inputs)
    write_json(join(out_uri, MARKER), {"stage": stage})
    fs, path = filesystem(out_uri)
    spared = {MARKER, *keep}
    for entry in sorted(_entries(fs, path), key=lambda e: _name(e) != MANIFEST):
        if _name(entry) not in spared:
            fs.rm(entry, recursive=True)
    makedirs(out_uri)


def write_manifest(
    out_uri: str,
    *,
    stage: str,
    inputs: dict[str, str],
    config_hash: str,
    outputs: dict[str, Any],
    metrics: dict[str, Any],
    started: float,
    key: str | None = None,
    files: dict[str, dict] | None = None,
) -> dict:
    """Write `_manifest.json` last; its presence marks the stage output as complete. `key` and `files`: the
    stage's content-chained cache key and its files' sizes and digests (stage_keys.py)."""
    manifest = {
        "stage": stage,
        "inputs": inputs,
        "config_hash": config_hash,
        "code_version": CODE_VERSION,
        "key": key,
        "files": files,
        "outputs": outputs,
        "metrics": metrics,
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(manifest_uri(out_uri), manifest)
    return manifest
