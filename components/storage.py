"""Artifacts addressed by URI (local path or s3://...) through fsspec: atomic writes and stage manifests.

A stage writes `_stage.json` (its marker) first, its files next and `_manifest.json` last. A directory with
the marker but no manifest is a half artifact: it is wiped before the same stage runs again.

A stage owns only what it created: `prepare_output` refuses (`OutputNotOwned`, nothing deleted) an output
location that is an existing file, holds files of no stage or of another stage, or overlaps the stage's
inputs. `child` derives a path under a root and refuses one that would leave it (`OutsideRoot`). When a finished
output may be skipped is decided by its content-chained key (components/stage_keys.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
MARKER = "_stage.json"  # {"stage": name}: written before any other file of a stage's output
LOCK_FILE = "_lock.json"  # a writer's lock on the directory (components/run_lock.py; its helper files start
# with the same name): part of no output
CODE_VERSION = "0.1.0"


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *[p.strip("/") for p in parts]])


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: a reader sees the old object, nothing, or the whole new one."""
    fs, path = filesystem(uri)
    if is_local(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:  # object stores publish a PUT only once it is complete
        with fs.open(path, "wb") as fh:
            fh.write(data)


class ArtifactError(ValueError):
    """An artifact that exists but cannot be read as what it should be (truncated, corrupt, another format, an
    incomplete model directory); the message names its URI and what is wrong."""


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        return fh.read()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ArtifactError(f"{uri}: not a JSON file or truncated ({exc})") from exc


def write_parquet(table: pa.Table, uri: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


def read_parquet(uri: str) -> pa.Table:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"artifact not found: {uri}")
    with fs.open(path, "rb") as fh:
        try:
            return pq.read_table(fh)
        except pa.ArrowException as exc:
            reason = str(exc).split("'<Buffer>': ", 1)[-1]  # pyarrow names the open buffer, not the file
            raise ArtifactError(f"{uri}: not a Parquet file or truncated ({reason})") from exc


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory's files to `uri` (a no-op when `uri` is that same local directory)."""
    local_dir = Path(local_dir)
    if is_local(uri) and Path(filesystem(uri)[1]).resolve() == local_dir.resolve():
        return
    for file in sorted(local_dir.rglob("*")):
        if file.is_file():
            write_bytes(join(uri, str(file.relative_to(local_dir))), file.read_bytes())


CACHE_MAX_GB = 20.0  # default bound of the local copies of remote directories (config: storage.cache_max_gb)
CACHE_IN_USE_S = 60.0  # a copy read this recently may be loading in another process: never evicted
TRAINING_STATE = ("optimizer.pt", "_checkpoints")  # a train stage's optimizer state: not needed to load a model
_STAMP = ".complete"  # in a cached copy: the listing digest it was fetched at; its mtime is the last use
_ABANDONED_S = 3600.0  # a partial download this old belongs to a killed process


def _listing(fs: fsspec.AbstractFileSystem, path: str, skip: tuple[str, ...]) -> dict[str, tuple[str, dict]]:
    """{relative name: (remote path, info)} of the files under `path`, without those inside an entry named in
    `skip` (at any depth) and without a writer's lock."""
    root = path.rstrip("/")
    out = {}
    for name, info in sorted(fs.find(root, detail=True).items()):
        rel = name[len(root):].lstrip("/")
        parts = rel.split("/")
        if rel and not any(p in skip for p in parts) and not parts[-1].startswith(LOCK_FILE):
            out[rel] = (name, info)
    return out


def _listing_digest(listing: dict[str, tuple[str, dict]]) -> str:
    """A digest of a remote directory's file names, sizes and versions (ETag / mtime when the store has them)."""
    entries = []
    for rel, (_, info) in sorted(listing.items()):
        version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
        entries.append(f"{rel}|{info.get('size')}|{version}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / f).stat().st_size
    return total


def _evict(cache_root: Path, max_bytes: float, keep: Path) -> None:
    """Delete the least recently used copies under `cache_root` until they total at most `max_bytes`; never
    `keep` or a copy used in the last `CACHE_IN_USE_S` seconds. Also clears abandoned partial downloads."""
    now, copies = time.time(), []
    for entry in cache_root.iterdir():
        try:
            if entry.name.startswith(".tmp-"):
                if now - entry.stat().st_mtime > _ABANDONED_S:
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            used = (entry / _STAMP).stat().st_mtime if (entry / _STAMP).exists() else entry.stat().st_mtime
        except OSError:  # removed meanwhile by another process
            continue
        copies.append((used, entry, _tree_bytes(entry)))
    total = sum(size for _, _, size in copies)
    for used, entry, size in sorted(copies, key=lambda c: c[0]):
        if total <= max_bytes:
            break
        if entry == keep or now - used < CACHE_IN_USE_S:
            continue
        gone = cache_root / f".tmp-evict-{uuid.uuid4().hex}"
        try:
            os.replace(entry, gone)  # out of sight at once, then deleted
        except OSError:
            continue
        shutil.rmtree(gone, ignore_errors=True)
        total -= size


def local_dir(uri: str, cache_root: str | Path | None = None, *, max_gb: float | None = CACHE_MAX_GB,
              skip: tuple[str, ...] = ()) -> Path:
    """A local directory holding the files under `uri`: the path itself when local, else a downloaded copy.

    Copies are cached per URI under `cache_root` (default `$TMPDIR/arborl-cache`) and fetched again whenever the
    remote listing (names, sizes, versions) changes. Files inside entries named in `skip` (at any depth, e.g.
    `TRAINING_STATE`) are not fetched. Each read marks its copy as used; then the least recently used copies
    beyond `max_gb` in total are deleted (not the one returned, nor one used in the last `CACHE_IN_USE_S`
    seconds); None: no bound.
    """
    fs, path = filesystem(uri)
    if is_local(uri):
        return Path(path)
    cache_root = Path(cache_root or Path(tempfile.gettempdir()) / "arborl-cache")
    cache_root.mkdir(parents=True, exist_ok=True)
    key = json.dumps([str(uri).rstrip("/"), sorted(skip)]) if skip else str(uri).rstrip("/")
    target = cache_root / hashlib.sha256(key.encode()).hexdigest()[:24]
    listing = _listing(fs, path, skip)
    digest = _listing_digest(listing)
    stamp = target / _STAMP
    if not (stamp.exists() and stamp.read_text() == digest):
        tmp = cache_root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            if listing:
                local = [tmp / rel for rel in listing]
                for file in local:
                    file.parent.mkdir(parents=True, exist_ok=True)
                fs.get([remote for remote, _ in listing.values()], [str(f) for f in local])
            (tmp / _STAMP).write_text(digest)
            if target.exists():
                old = cache_root / f".tmp-old-{uuid.uuid4().hex}"
                with contextlib.suppress(FileNotFoundError):
                    os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:  # another process put its copy there meanwhile
                if not (stamp.exists() and stamp.read_text() == digest):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    os.utime(stamp)  # the last use, for eviction
    if max_gb is not None:
        _evict(cache_root, max_gb * 1e9, keep=target)
    return target


# --- where outputs may go ----------------------------------------------------------------------------


class OutputNotOwned(ValueError):
    """A stage's output location holds something the stage did not create, or overlaps one of its inputs.

    Raised before the stage writes or deletes anything."""

    def __init__(self, stage: str, uri: str, reason: str):
        self.stage, self.uri, self.reason = stage, uri, reason
        super().__init__(f"stage {stage!r} will not write its output to {uri}: {reason}. Nothing was deleted; "
                         f"choose a new or empty location, or an earlier output of this stage")

    def __reduce__(self):  # pickled across worker processes
        return type(self), (self.stage, self.uri, self.reason)


class OutsideRoot(ValueError):
    """A path derived under a root would lie outside it (e.g. a name holding `..` or a separator)."""

    def __init__(self, root: str, uri: str):
        self.root, self.uri = root, uri
        super().__init__(f"{uri} is not inside {root}: a path derived under {root} must stay inside it")

    def __reduce__(self):
        return type(self), (self.root, self.uri)


def _location(uri: str, *, physical: bool) -> tuple[str, str]:
    """(scheme, normalised path) of `uri` for comparing locations: local paths absolute with `..` and trailing
    slashes resolved (`physical`: symbolic links too), `file://` dropped; remote URIs as bucket/key with the
    same lexical clean-up."""
    text = str(uri)
    if is_local(text):
        path = os.path.abspath(text.removeprefix("file://") or ".")
        return "file", os.path.realpath(path) if physical else path
    scheme, rest = text.split("://", 1)
    return scheme.lower(), posixpath.normpath("/" + rest).lstrip("/")


def _within(outer: tuple[str, str], inner: tuple[str, str]) -> bool:
    """Whether location `inner` is `outer` or below it, on path-component boundaries."""
    (scheme, a), (other, b) = outer, inner
    if scheme != other:
        return False
    sep = os.sep if scheme == "file" else "/"
    return b == a or a == "" or b.startswith(a if a.endswith(sep) else a + sep)


def contains(outer: str, inner: str) -> bool:
    """Whether the location `inner` is `outer` or inside it (normalised; `s3://b/run` does not contain
    `s3://b/run2`)."""
    return _within(_location(outer, physical=True), _location(inner, physical=True))


def ensure_inside(root: str, uri: str) -> str:
    """`uri` when it lies strictly below `root` (compared lexically), else `OutsideRoot`."""
    r, u = _location(root, physical=False), _location(uri, physical=False)
    if u == r or not _within(r, u):
        raise OutsideRoot(root, uri)
    return uri


def child(root: str, *parts: str) -> str:
    """`join(root, *parts)`, refused (`OutsideRoot`) when the parts would lead out of `root` or back to it."""
    return ensure_inside(root, join(root, *parts))


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
    out = _location(out_uri, physical=True)
    for key, uri in (inputs or {}).items():
        where = _location(uri, physical=True)
        if out == where:
            raise OutputNotOwned(stage, out_uri, f"it is the stage's input {key!r} ({uri})")
        if _within(where, out):
            raise OutputNotOwned(stage, out_uri, f"it lies inside the stage's input {key!r} ({uri})")
        if _within(out, where):
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
    stage's content-chained cache key and its files' sizes and digests (components/stage_keys.py)."""
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
