"""One writer per directory: a lock file at the root of what a command writes.

`<root>/_lock.json` (a local path or `s3://…`) names its holder:

    {"version": 1, "owner": "alice", "host": "node-3", "pid": 4242, "command": "arborl run",
     "started": 1767225600.0, "started_at": "2026-01-01T00:00:00Z",
     "heartbeat": 1767225630.0, "heartbeat_at": "2026-01-01T00:00:30Z",
     "token": "<random hex>", "pid_namespace": "pid:[4026531836]", "boot_id": "<kernel boot id>"}

* **Exclusive create.** The file is created with `O_CREAT | O_EXCL` on a local file system and with a
  conditional PutObject (`If-None-Match: *`, through s3fs with the same endpoint and credentials as every
  other artifact) on S3, so of two writers started at once exactly one gets it. The other fails at once
  with `LockHeld`, whose one-line message names the holder (host, pid, owner, command, since, last
  heartbeat) and the lock's URI.
* **Heartbeat.** While held, a background thread rewrites `heartbeat` every `stale_after / 6` seconds,
  only while the file is still this holder's (S3: `If-Match: <etag>` of its last write).
* **Stale locks are taken over**, with a logged warning: a lock whose holder ran on this host (same host
  name, process namespace and boot) in a process that is gone, or whose heartbeat is older than
  `stale_after` (`STALE_AFTER_S`, 60 s; a lock from an earlier boot of this host is stale too). The
  takeover replaces exactly the stale file — S3: `If-Match: <etag of the stale lock>`; local: under a
  short exclusive guard file — so two writers taking over one stale lock still end with one holder.
  Clocks of hosts sharing a root must agree to well within `stale_after`.
* **Release** deletes the file, only while it is still this holder's, when the `with` block exits, also on
  an exception. A process killed outright leaves its lock behind: the next writer on the same host takes it
  over at once (dead pid), one elsewhere after `stale_after`.
* **Nested use in one process** is allowed: acquiring a root this process already holds (e.g. the
  `arborl run` command, then the flow it starts) does nothing, and only the outer release releases.

S3 stores that ignore `If-None-Match` (older S3-compatible servers) would let two creates through: the
lock is read back after creating and a writer that does not find its own token there gives up.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arborl.components.artifacts import storage

log = logging.getLogger(__name__)

LOCK_FILE = storage.LOCK_FILE
STALE_AFTER_S = 60.0  # a lock whose heartbeat is older than this is stale
FORMAT_VERSION = 1
_GUARD_STALE_S = 10.0  # a local takeover guard older than this was left by a killed process
_CREATE_ATTEMPTS = 5


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _owner() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name for this uid (some containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def _pid_alive(pid: int) -> bool:
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
                   heartbeat=now, token=uuid.uuid4().hex, command=command, pid_namespace=_pid_namespace(),
                   boot_id=_read_text("/proc/sys/kernel/random/boot_id"))

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
class _Current:
    """A lock file as read: its bytes, the holder in them (None: unreadable), its version and its age."""

    raw: bytes
    holder: Holder | None
    version: Any  # S3: the ETag; local: the bytes
    modified: float


class LockHeld(RuntimeError):
    """Another writer holds the lock on `root`."""

    def __init__(self, root: str, uri: str, holder: Holder | None, stale_after: float = STALE_AFTER_S):
        self.root, self.uri, self.holder = root, uri, holder
        who = holder.describe() if holder else "a lock file that is being written or is unreadable"
        super().__init__(f"{root} is locked by another writer ({who}); lock file {uri}. Wait for it to finish "
                         f"(a lock whose process is gone is taken over: at once on its host, elsewhere after "
                         f"{stale_after:.0f} s without heartbeat)")


class _Conflict(Exception):
    """The lock file is no longer the one the caller read."""


class _LocalFile:
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

    def read(self) -> _Current | None:
        for attempt in range(5):
            try:
                raw, modified = self.path.read_bytes(), self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            holder = Holder.from_bytes(raw)
            if holder is not None:
                break
            time.sleep(0.02 * (attempt + 1))  # created, not yet written: look again
        return _Current(raw, holder, raw, modified)

    @contextlib.contextmanager
    def _guard(self):
        for _ in range(250):
            try:
                os.close(os.open(self.guard_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - self.guard_path.stat().st_mtime > _GUARD_STALE_S:
                        self.guard_path.unlink(missing_ok=True)
                        continue
                time.sleep(0.02)
        else:
            raise _Conflict("the lock's guard file stays taken")
        try:
            yield
        finally:
            self.guard_path.unlink(missing_ok=True)

    def swap(self, data: bytes, current: _Current) -> Any:
        with self._guard():
            try:
                if self.path.read_bytes() != current.version:
                    raise _Conflict("the lock file changed")
            except FileNotFoundError:
                raise _Conflict("the lock file is gone") from None
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

    def delete(self, current: _Current) -> None:
        with self._guard():
            try:
                if self.path.read_bytes() != current.version:
                    raise _Conflict("the lock file changed")
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


class _S3Object:
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

    def read(self) -> _Current | None:
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
        return _Current(raw, Holder.from_bytes(raw), etag, modified)

    def swap(self, data: bytes, current: _Current) -> Any:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfMatch=current.version)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or _lost_race(exc):
                raise _Conflict(str(exc)) from exc
            raise
        return out["ETag"]

    def delete(self, current: _Current) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=current.version)
        except FileNotFoundError:
            return
        except OSError as exc:
            if _lost_race(exc):
                raise _Conflict(str(exc)) from exc
            code, status = _s3_error(exc)
            if status != 501 and code not in ("NotImplemented", "InvalidArgument"):
                raise
            # a store without conditional deletes: compare, then delete (a takeover in between is lost)
            now = self.read()
            if now is not None and now.version == current.version:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


_HELD: dict[str, RunLock] = {}  # lock URI → the lock this process holds on it
_HELD_GUARD = threading.Lock()


def _key(uri: str) -> str:
    if storage.is_local(uri):
        return str(Path(storage.filesystem(uri)[1]).resolve())
    return uri


class RunLock:
    """The lock on `root` (`<root>/_lock.json`); use as `with RunLock(root, "arborl run"):`.

    `acquire` raises `LockHeld` when a live writer holds it; `stale_after` (seconds without heartbeat) and
    `heartbeat_every` (default `stale_after / 6`) are for tests and unusual stores.
    """

    def __init__(self, root: str, command: str = "", *, stale_after: float = STALE_AFTER_S,
                 heartbeat_every: float | None = None):
        self.root = str(root).rstrip("/")
        self.uri = storage.join(self.root, LOCK_FILE)
        self.command = command
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every or stale_after / 6
        self.lost = False  # set when another writer took the lock over while this one held it
        self._file = _LocalFile(storage.filesystem(self.uri)[1]) if storage.is_local(self.uri) else _S3Object(self.uri)
        self._made_root = False  # local: the lock created the root directory (removed again if left empty)
        self._key = _key(self.uri)
        self._outer: RunLock | None = None
        self._holder: Holder | None = None
        self._current: _Current | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    @property
    def held(self) -> bool:
        return self._holder is not None or self._outer is not None

    def _stale_reason(self, current: _Current) -> str | None:
        now, holder = time.time(), current.holder
        if holder is None:
            age = now - current.modified
            return f"unreadable and {age:.0f} s old" if age > self.stale_after else None
        if holder.host == socket.gethostname() and holder.pid_namespace == _pid_namespace():
            boot = _read_text("/proc/sys/kernel/random/boot_id")
            if holder.boot_id and boot and holder.boot_id != boot:
                return "its host has rebooted since"
            if holder.pid != os.getpid() and not _pid_alive(holder.pid):
                return f"its process {holder.pid} is gone"
        age = now - holder.heartbeat
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s (limit {self.stale_after:.0f} s)"
        return None

    def acquire(self) -> RunLock:
        with _HELD_GUARD:
            outer = _HELD.get(self._key)
            if outer is not None:
                self._outer = outer
                return self
        me = Holder.me(self.command)
        data = me.to_bytes()
        if isinstance(self._file, _LocalFile):
            self._made_root = not self._file.path.parent.is_dir()
        current: _Current | None = None
        for _ in range(_CREATE_ATTEMPTS):
            try:
                version = self._file.create(data)
                self._took(me, _Current(data, me, version, me.started))
                return self
            except FileExistsError:
                pass
            current = self._file.read()
            if current is None:
                continue  # released in between: try again
            reason = self._stale_reason(current)
            if reason is None:
                raise LockHeld(self.root, self.uri, current.holder, self.stale_after)
            held_by = current.holder.describe() if current.holder else "unknown holder"
            log.warning("taking over the stale lock %s (%s): %s", self.uri, held_by, reason)
            try:
                version = self._file.swap(data, current)
            except _Conflict:
                continue  # another writer changed it first: look again
            self._took(me, _Current(data, me, version, me.started))
            return self
        raise LockHeld(self.root, self.uri, current.holder if current else None, self.stale_after)

    def _took(self, me: Holder, current: _Current) -> None:
        if not storage.is_local(self.uri):
            # a store that ignored the condition would have let another create through: the last write wins
            seen = self._file.read()
            if seen is None or seen.holder is None or seen.holder.token != me.token:
                raise LockHeld(self.root, self.uri, seen.holder if seen else None, self.stale_after)
            current = seen
        self._holder, self._current = me, current
        with _HELD_GUARD:
            _HELD[self._key] = self
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.root}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            try:
                self.refresh()
            except _Conflict:
                self.lost = True
                seen = self._file.read()
                who = seen.holder.describe() if seen and seen.holder else "nobody"
                log.error("lock %s is no longer held by this process (now: %s); stopping its heartbeat",
                          self.uri, who)
                return
            except Exception as exc:  # a store hiccup: try again at the next beat
                log.warning("heartbeat of lock %s failed: %s", self.uri, exc)

    def refresh(self) -> None:
        """Rewrite the heartbeat now (the background thread does this every `heartbeat_every` seconds)."""
        with self._mutex:
            if self._holder is None or self._current is None:
                return
            holder = self._holder.beat()
            data = holder.to_bytes()
            version = self._file.swap(data, self._current)
            self._holder, self._current = holder, _Current(data, holder, version, holder.heartbeat)

    def release(self) -> None:
        if self._outer is not None:
            self._outer = None
            return
        if self._holder is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with _HELD_GUARD:
            if _HELD.get(self._key) is self:
                del _HELD[self._key]
        with self._mutex:
            current, self._holder, self._current = self._current, None, None
        if current is None or self.lost:
            return
        try:
            self._file.delete(current)
        except _Conflict:
            log.error("lock %s was taken over by another writer; left in place", self.uri)
            return
        if self._made_root:
            with contextlib.suppress(OSError):  # only when empty: the command wrote nothing there
                self._file.path.parent.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(root: str) -> Holder | None:
    """The holder named in `<root>/_lock.json`, or None when there is no (readable) lock."""
    uri = storage.join(str(root).rstrip("/"), LOCK_FILE)
    current = (_LocalFile(storage.filesystem(uri)[1]) if storage.is_local(uri) else _S3Object(uri)).read()
    return current.holder if current else None
