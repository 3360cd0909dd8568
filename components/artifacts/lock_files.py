"""The lock file itself: what it holds (`Holder`) and how it is created exclusively, read, replaced only while
unchanged, and deleted, on a local disk (`LocalFile`) or as one S3 object (`S3Object`). The locking policy
(staleness, heartbeat, takeover, nesting) is `run_lock.py`."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arborl.components.artifacts import storage

FORMAT_VERSION = 1
GUARD_STALE_S = 10.0  # a local takeover guard older than this was left by a killed process


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _owner() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name for this uid (some containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in its file."""

    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    command: str = ""
    pid_namespace: str = ""
    boot_id: str = ""

    @classmethod
    def me(cls, command: str, started: float | None = None) -> Holder:
        now = time.time()
        return cls(owner=_owner(), host=socket.gethostname(), pid=os.getpid(), started=started or now,
                   heartbeat=now, token=uuid.uuid4().hex, command=command, pid_namespace=pid_namespace(),
                   boot_id=read_text("/proc/sys/kernel/random/boot_id"))

    def to_bytes(self) -> bytes:
        data = {"version": FORMAT_VERSION, "owner": self.owner, "host": self.host, "pid": self.pid,
                "command": self.command, "started": self.started, "started_at": _iso(self.started),
                "heartbeat": self.heartbeat, "heartbeat_at": _iso(self.heartbeat), "token": self.token,
                "pid_namespace": self.pid_namespace, "boot_id": self.boot_id}
        return json.dumps(data, indent=2).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Holder | None:
        """The holder in a lock file's bytes; None when they are not a whole lock file."""
        try:
            data = json.loads(raw)
            return cls(owner=str(data["owner"]), host=str(data["host"]), pid=int(data["pid"]),
                       started=float(data["started"]), heartbeat=float(data["heartbeat"]),
                       token=str(data["token"]), command=str(data.get("command", "")),
                       pid_namespace=str(data.get("pid_namespace", "")), boot_id=str(data.get("boot_id", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def beat(self) -> Holder:
        return Holder(**{**self.__dict__, "heartbeat": time.time()})

    def describe(self, now: float | None = None) -> str:
        age = max(0.0, (now or time.time()) - self.heartbeat)
        command = f", command {self.command!r}" if self.command else ""
        return (f"host {self.host}, pid {self.pid}, owner {self.owner}{command}, since {_iso(self.started)}, "
                f"last heartbeat {_iso(self.heartbeat)} ({age:.0f} s ago)")


@dataclass(frozen=True)
class Current:
    """A lock file as read: its bytes, the holder in them (None: unreadable), its version and its age."""

    raw: bytes
    holder: Holder | None
    version: Any  # S3: the ETag; local: the bytes
    modified: float


class Conflict(Exception):
    """The lock file is no longer the one the caller read."""


class LocalFile:
    def __init__(self, path: str):
        self.path = Path(path)
        self.guard_path = self.path.with_name(self.path.name + ".guard")

    def create(self, data: bytes) -> Any:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # not FileExistsError, which means "held"
            raise OSError(f"cannot create the directory of lock {self.path}: {exc}") from exc
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # FileExistsError: held
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:  # e.g. a full disk: leave no empty lock behind
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return data

    def read(self) -> Current | None:
        for attempt in range(5):
            try:
                raw, modified = self.path.read_bytes(), self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            holder = Holder.from_bytes(raw)
            if holder is not None:
                break
            time.sleep(0.02 * (attempt + 1))  # created, not yet written: look again
        return Current(raw, holder, raw, modified)

    @contextlib.contextmanager
    def _guard(self):
        for _ in range(250):
            try:
                os.close(os.open(self.guard_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - self.guard_path.stat().st_mtime > GUARD_STALE_S:
                        self.guard_path.unlink(missing_ok=True)
                        continue
                time.sleep(0.02)
        else:
            raise Conflict("the lock's guard file stays taken")
        try:
            yield
        finally:
            self.guard_path.unlink(missing_ok=True)

    def swap(self, data: bytes, current: Current) -> Any:
        with self._guard():
            try:
                if self.path.read_bytes() != current.version:
                    raise Conflict("the lock file changed")
            except FileNotFoundError:
                raise Conflict("the lock file is gone") from None
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return data

    def delete(self, current: Current) -> None:
        with self._guard():
            try:
                if self.path.read_bytes() != current.version:
                    raise Conflict("the lock file changed")
            except FileNotFoundError:
                return
            self.path.unlink(missing_ok=True)


def _s3_error(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore error behind an s3fs exception."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return (str(response.get("Error", {}).get("Code", "")),
                    int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0))
        seen = seen.__cause__ or seen.__context__
    return "", 0


def _lost_race(exc: BaseException) -> bool:
    code, status = _s3_error(exc)
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


class S3Object:
    """The lock as one S3 object, through s3fs's client (its endpoint, credentials and retries)."""

    def __init__(self, uri: str):
        self.fs, path = storage.filesystem(uri)
        self.bucket, self.key, _ = self.fs.split_path(path)

    def create(self, data: bytes) -> Any:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")
        except FileExistsError:
            raise
        except OSError as exc:
            if _lost_race(exc):
                raise FileExistsError(f"s3://{self.bucket}/{self.key}") from exc
            raise
        return out["ETag"]

    def read(self) -> Current | None:
        async def get() -> tuple[bytes, str, float]:
            out = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = out["Body"]
            try:
                raw = await body.read()
            finally:
                body.close()
            return raw, out["ETag"], out["LastModified"].timestamp()

        from fsspec.asyn import sync

        try:
            raw, etag, modified = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return Current(raw, Holder.from_bytes(raw), etag, modified)

    def swap(self, data: bytes, current: Current) -> Any:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfMatch=current.version)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or _lost_race(exc):
                raise Conflict(str(exc)) from exc
            raise
        return out["ETag"]

    def delete(self, current: Current) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=current.version)
        except FileNotFoundError:
            return
        except OSError as exc:
            if _lost_race(exc):
                raise Conflict(str(exc)) from exc
            code, status = _s3_error(exc)
            if status != 501 and code not in ("NotImplemented", "InvalidArgument"):
                raise
            # a store without conditional deletes: compare, then delete (a takeover in between is lost)
            now = self.read()
            if now is not None and now.version == current.version:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


def lock_file(uri: str) -> LocalFile | S3Object:
    """The lock file at `uri`: a local file or an S3 object."""
    return LocalFile(storage.filesystem(uri)[1]) if storage.is_local(uri) else S3Object(uri)
