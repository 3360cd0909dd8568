"""Local copies of remote directories (a model on S3 that torch must read from disk), cached per URI and bounded
in size: least recently used copies go first."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import fsspec

from arborl.components.artifacts.storage import LOCK_FILE, filesystem, is_local

CACHE_MAX_GB = 20.0  # default bound of the local copies of remote directories (config: storage.cache_max_gb)
CACHE_IN_USE_S = 60.0  # a copy read this recently may be loading in another process: never evicted
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
