"""Artifacts addressed by URI (local path or s3://...) through fsspec: atomic writes and stage manifests.

A stage writes its files first and `_manifest.json` last. A directory without a manifest is a half
artifact: it is wiped before the stage runs again. A manifest whose inputs and config hash match the
current call means the stage is done and is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        return fh.read()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_parquet(table: pa.Table, uri: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


def read_parquet(uri: str) -> pa.Table:
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"artifact not found: {uri}")
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory's files to `uri` (a no-op when `uri` is that same local directory)."""
    local_dir = Path(local_dir)
    if is_local(uri) and Path(filesystem(uri)[1]).resolve() == local_dir.resolve():
        return
    for file in sorted(local_dir.rglob("*")):
        if file.is_file():
            write_bytes(join(uri, str(file.relative_to(local_dir))), file.read_bytes())


def _listing_digest(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A digest of a remote directory's file names, sizes and versions (ETag / mtime when the store has them)."""
    entries = []
    for name, info in sorted(fs.find(path, detail=True).items()):
        version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
        entries.append(f"{name}|{info.get('size')}|{version}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def local_dir(uri: str, cache_root: str | Path | None = None) -> Path:
    """A local directory holding the files under `uri`: the path itself when local, else a downloaded copy.

    Copies are cached per URI and fetched again whenever the remote listing (names, sizes, versions) changes.
    """
    fs, path = filesystem(uri)
    if is_local(uri):
        return Path(path)
    cache_root = Path(cache_root or Path(tempfile.gettempdir()) / "arborl-cache")
    cache_root.mkdir(parents=True, exist_ok=True)
    target = cache_root / hashlib.sha256(str(uri).rstrip("/").encode()).hexdigest()[:24]
    digest = _listing_digest(fs, path)
    stamp = target / ".complete"
    if not (stamp.exists() and stamp.read_text() == digest):
        tmp = cache_root / f".tmp-{uuid.uuid4().hex}"
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        (tmp / ".complete").write_text(digest)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return target


# --- manifests -------------------------------------------------------------------------------------


def manifest_uri(out_uri: str) -> str:
    return join(out_uri, MANIFEST)


def read_manifest(out_uri: str) -> dict | None:
    uri = manifest_uri(out_uri)
    if not exists(uri):
        return None
    return read_json(uri)


def completed(out_uri: str, *, stage: str, inputs: dict[str, str], config_hash: str) -> dict | None:
    """The manifest of a finished stage at `out_uri` if it was made from these inputs and config, else None."""
    manifest = read_manifest(out_uri)
    if manifest is None:
        return None
    same = (
        manifest.get("stage") == stage
        and manifest.get("inputs") == inputs
        and manifest.get("config_hash") == config_hash
        and manifest.get("code_version") == CODE_VERSION
    )
    return manifest if same else None


def prepare_output(out_uri: str, keep: tuple[str, ...] = ()) -> None:
    """Wipe a stale or half-written output before a stage writes it again, except the entries named in `keep`
    (e.g. a train stage's in-stage checkpoints, which a rerun resumes from)."""
    fs, path = filesystem(out_uri)
    if keep and fs.exists(path):
        for entry in fs.ls(path, detail=False):
            if entry.rstrip("/").rsplit("/", 1)[-1] not in keep:
                fs.rm(entry, recursive=True)
    else:
        remove(out_uri)
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
) -> dict:
    """Write `_manifest.json` last; its presence marks the stage output as complete."""
    manifest = {
        "stage": stage,
        "inputs": inputs,
        "config_hash": config_hash,
        "code_version": CODE_VERSION,
        "outputs": outputs,
        "metrics": metrics,
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(manifest_uri(out_uri), manifest)
    return manifest
