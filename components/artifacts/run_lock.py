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
import logging
import os
import socket
import threading
import time
from pathlib import Path

from arborl.components.artifacts import storage
from arborl.components.artifacts.lock_files import (
    Conflict,
    Current,
    Holder,
    LocalFile,
    lock_file,
    pid_alive,
    pid_namespace,
    read_text,
)

log = logging.getLogger(__name__)

LOCK_FILE = storage.LOCK_FILE
STALE_AFTER_S = 60.0  # a lock whose heartbeat is older than this is stale
_CREATE_ATTEMPTS = 5
_HELD: dict[str, RunLock] = {}  # lock URI → the lock this process holds on it


class LockHeld(RuntimeError):
    """Another writer holds the lock on `root`."""

    def __init__(self, root: str, uri: str, holder: Holder | None, stale_after: float = STALE_AFTER_S):
        self.root, self.uri, self.holder = root, uri, holder
        who = holder.describe() if holder else "a lock file that is being written or is unreadable"
        super().__init__(f"{root} is locked by another writer ({who}); lock file {uri}. Wait for it to finish "
                         f"(a lock whose process is gone is taken over: at once on its host, elsewhere after "
                         f"{stale_after:.0f} s without heartbeat)")


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
        self._file = lock_file(self.uri)
        self._made_root = False  # local: the lock created the root directory (removed again if left empty)
        self._key = _key(self.uri)
        self._outer: RunLock | None = None
        self._holder: Holder | None = None
        self._current: Current | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    @property
    def held(self) -> bool:
        return self._holder is not None or self._outer is not None

    def _stale_reason(self, current: Current) -> str | None:
        now, holder = time.time(), current.holder
        if holder is None:
            age = now - current.modified
            return f"unreadable and {age:.0f} s old" if age > self.stale_after else None
        if holder.host == socket.gethostname() and holder.pid_namespace == pid_namespace():
            boot = read_text("/proc/sys/kernel/random/boot_id")
            if holder.boot_id and boot and holder.boot_id != boot:
                return "its host has rebooted since"
            if holder.pid != os.getpid() and not pid_alive(holder.pid):
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
        if isinstance(self._file, LocalFile):
            self._made_root = not self._file.path.parent.is_dir()
        current: Current | None = None
        for _ in range(_CREATE_ATTEMPTS):
            try:
                version = self._file.create(data)
                self._took(me, Current(data, me, version, me.started))
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
            except Conflict:
                continue  # another writer changed it first: look again
            self._took(me, Current(data, me, version, me.started))
            return self
        raise LockHeld(self.root, self.uri, current.holder if current else None, self.stale_after)

    def _took(self, me: Holder, current: Current) -> None:
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
            except Conflict:
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
            self._holder, self._current = holder, Current(data, holder, version, holder.heartbeat)

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
        except Conflict:
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
    current = lock_file(uri).read()
    return current.holder if current else None
