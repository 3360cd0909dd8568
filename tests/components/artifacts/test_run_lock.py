"""components.run_lock: one writer per directory, on a local file system and on S3 (a local moto server).

The other writer is a real second process; stale locks are made by killing it or by writing an old heartbeat."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from arborl.components.artifacts import lock_files, manifests, storage
from arborl.components.artifacts.lock_files import Holder
from arborl.components.artifacts.run_lock import LOCK_FILE, LockHeld, RunLock, read_holder

# a second writer: takes the lock of argv[1], says so, holds it until stdin closes or says "release"
HOLDER = """
import sys
from arborl.components.artifacts.run_lock import LockHeld, RunLock
try:
    lock = RunLock(sys.argv[1], "test holder", heartbeat_every=0.2).acquire()
except LockHeld as exc:
    print("refused", exc, flush=True)
    sys.exit(3)
print("held", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""

@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A run root that does not exist yet, on a local file system or on S3."""
    if request.param == "local":
        return str(tmp_path / "runs" / "tiny")
    # moto keeps its objects for the whole process: every test gets its own prefix
    return storage.join(request.getfixturevalue("s3_bucket")[0], uuid.uuid4().hex, "runs", "tiny")


def _start_holder(root: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line.startswith("held"), line
    return proc


def _write_lock(root: str, **fields) -> None:
    holder = {**Holder.me("elsewhere").__dict__, "host": "another-host", "pid": 4242, "owner": "someone",
              "pid_namespace": "", "boot_id": "", **fields}
    storage.write_bytes(storage.join(root, LOCK_FILE), Holder(**holder).to_bytes())


def test_the_lock_file_names_its_holder_and_goes_on_release(root):
    with RunLock(root, "arborl run configs/micro.yaml") as lock:
        assert lock.held
        data = storage.read_json(storage.join(root, LOCK_FILE))
        assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
        assert data["command"] == "arborl run configs/micro.yaml" and data["owner"]
        assert {"started", "started_at", "heartbeat", "heartbeat_at", "token", "version"} <= set(data)
        assert read_holder(root).token == data["token"]
    assert not storage.exists(storage.join(root, LOCK_FILE))
    assert read_holder(root) is None


def test_a_second_writer_is_refused_at_once_naming_the_holder(root):
    holder = _start_holder(root)
    try:
        started = time.monotonic()
        with pytest.raises(LockHeld) as err:
            RunLock(root, "arborl run").acquire()
        assert time.monotonic() - started < 5
        message = str(err.value)
        assert "\n" not in message
        for part in (f"pid {holder.pid}", f"host {socket.gethostname()}", "command 'test holder'", "since ",
                     "last heartbeat", storage.join(root, LOCK_FILE)):
            assert part in message, (part, message)
        assert err.value.holder.pid == holder.pid
    finally:
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        holder.wait(timeout=30)
    with RunLock(root, "arborl run"):  # released: free for the next writer
        pass


def test_a_lock_of_a_killed_process_on_this_host_is_taken_over_with_a_warning(root, caplog):
    holder = _start_holder(root)
    holder.kill()
    holder.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="arborl.components.artifacts.run_lock"):
        with RunLock(root, "arborl run") as lock:
            assert read_holder(root).pid == os.getpid() and not lock.lost
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "taking over the stale lock" in warning and f"process {holder.pid} is gone" in warning
    assert not storage.exists(storage.join(root, LOCK_FILE))


def test_a_lock_without_heartbeat_is_stale_a_fresh_one_from_another_host_is_not(root, caplog):
    _write_lock(root, heartbeat=time.time() - 5)
    with pytest.raises(LockHeld, match=r"host another-host, pid 4242, owner someone"):
        RunLock(root).acquire()
    _write_lock(root, heartbeat=time.time() - 120)
    with caplog.at_level(logging.WARNING, logger="arborl.components.artifacts.run_lock"):
        with RunLock(root):
            assert read_holder(root).host == socket.gethostname()
    assert "no heartbeat for 120 s (limit 60 s)" in caplog.text
    # the timeout is a parameter
    _write_lock(root, heartbeat=time.time() - 5)
    with RunLock(root, stale_after=2):
        pass


def test_the_lock_is_released_when_the_block_raises(root):
    with pytest.raises(RuntimeError, match="stage failed"):
        with RunLock(root, "arborl run"):
            assert storage.exists(storage.join(root, LOCK_FILE))
            raise RuntimeError("stage failed")
    assert not storage.exists(storage.join(root, LOCK_FILE))
    holder = _start_holder(root)  # another process can take it now
    holder.stdin.close()
    holder.wait(timeout=30)


def test_the_heartbeat_moves_and_a_taken_over_lock_is_not_deleted(root):
    lock = RunLock(root, heartbeat_every=0.1).acquire()
    try:
        first = read_holder(root)
        deadline = time.time() + 10
        while read_holder(root).heartbeat == first.heartbeat and time.time() < deadline:
            time.sleep(0.05)
        beat = read_holder(root)
        assert beat.heartbeat > first.heartbeat and beat.token == first.token and beat.started == first.started
        # another writer took it over (e.g. this process stalled past the timeout): the heartbeat stops
        _write_lock(root, heartbeat=time.time())
        deadline = time.time() + 10
        while not lock.lost and time.time() < deadline:
            time.sleep(0.05)
        assert lock.lost
    finally:
        lock.release()
    assert read_holder(root).host == "another-host"  # left to its new holder


def test_nested_use_in_one_process_holds_one_lock(root):
    with RunLock(root, "arborl run") as outer:
        token = read_holder(root).token
        with RunLock(root, "arborl run (flow)") as inner:
            assert inner.held and read_holder(root).token == token
        assert storage.exists(storage.join(root, LOCK_FILE))  # the inner release keeps the outer's lock
        assert outer.held
    assert not storage.exists(storage.join(root, LOCK_FILE))


def test_of_writers_started_at_once_exactly_one_gets_the_lock(root):
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    try:
        first = [p.stdout.readline().split(" ", 1)[0].strip() for p in procs]
        assert sorted(first) == ["held", "refused", "refused"], first
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)
    assert sorted(p.returncode for p in procs) == [0, 3, 3]


def test_s3_refuses_a_conditional_create_of_an_existing_object(s3_bucket):
    """The store itself enforces If-None-Match (412) and If-Match, which the lock relies on."""
    from botocore.exceptions import ClientError

    _, client = s3_bucket
    client.put_object(Bucket="arborl-test", Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket="arborl-test", Key="k", Body=b"2", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket="arborl-test", Key="k", Body=b"2", IfMatch='"not-the-etag"')
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket="arborl-test", Key="k")["Body"].read() == b"1"


def test_two_takeovers_of_one_stale_lock_end_with_one_holder(root):
    """Both writers read the same stale lock; the first replaces it, the second's replace is refused."""
    _write_lock(root, heartbeat=time.time() - 120)
    uri = storage.join(root, LOCK_FILE)
    file = lock_files.lock_file(uri)
    stale = file.read()
    first = Holder.me("first")
    file.swap(first.to_bytes(), stale)
    with pytest.raises(lock_files.Conflict):
        file.swap(Holder.me("second").to_bytes(), stale)
    assert read_holder(root).token == first.token
    assert RunLock(root)._stale_reason(file.read()) is None  # the first taker's lock is live


def test_stage_outputs_do_not_count_the_lock_as_content(tmp_path):
    """`arborl stage` locks its --out directory: the lock must not make it look like someone else's output."""
    out = str(tmp_path / "out")
    with RunLock(out, "arborl stage prepare"):
        manifests.check_output(out, stage="prepare")
        manifests.prepare_output(out, stage="prepare")
        assert storage.exists(storage.join(out, LOCK_FILE))
    assert json.loads((tmp_path / "out" / manifests.MARKER).read_text()) == {"stage": "prepare"}
