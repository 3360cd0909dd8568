"""Artifacts addressed by URI (local path or s3://...) through fsspec: atomic reads and writes, and paths kept
under their root.

`child` derives a path under a root and refuses one that would leave it (`OutsideRoot`). What a stage's output
directory holds, and who owns it, is `manifests.py`; local copies of remote directories are `local_cache.py`.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

LOCK_FILE = "_lock.json"  # a writer's lock on a directory (run_lock.py; its helper files start with the same name)

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


class OutsideRoot(ValueError):
    """A path derived under a root would lie outside it (e.g. a name holding `..` or a separator)."""

    def __init__(self, root: str, uri: str):
        self.root, self.uri = root, uri
        super().__init__(f"{uri} is not inside {root}: a path derived under {root} must stay inside it")

    def __reduce__(self):
        return type(self), (self.root, self.uri)


def location(uri: str, *, physical: bool) -> tuple[str, str]:
    """(scheme, normalised path) of `uri` for comparing locations: local paths absolute with `..` and trailing
    slashes resolved (`physical`: symbolic links too), `file://` dropped; remote URIs as bucket/key with the
    same lexical clean-up."""
    text = str(uri)
    if is_local(text):
        path = os.path.abspath(text.removeprefix("file://") or ".")
        return "file", os.path.realpath(path) if physical else path
    scheme, rest = text.split("://", 1)
    return scheme.lower(), posixpath.normpath("/" + rest).lstrip("/")


def within(outer: tuple[str, str], inner: tuple[str, str]) -> bool:
    """Whether location `inner` is `outer` or below it, on path-component boundaries."""
    (scheme, a), (other, b) = outer, inner
    if scheme != other:
        return False
    sep = os.sep if scheme == "file" else "/"
    return b == a or a == "" or b.startswith(a if a.endswith(sep) else a + sep)


def contains(outer: str, inner: str) -> bool:
    """Whether the location `inner` is `outer` or inside it (normalised; `s3://b/run` does not contain
    `s3://b/run2`)."""
    return within(location(outer, physical=True), location(inner, physical=True))


def ensure_inside(root: str, uri: str) -> str:
    """`uri` when it lies strictly below `root` (compared lexically), else `OutsideRoot`."""
    r, u = location(root, physical=False), location(uri, physical=False)
    if u == r or not within(r, u):
        raise OutsideRoot(root, uri)
    return uri


def child(root: str, *parts: str) -> str:
    """`join(root, *parts)`, refused (`OutsideRoot`) when the parts would lead out of `root` or back to it."""
    return ensure_inside(root, join(root, *parts))
