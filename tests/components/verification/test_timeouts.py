"""components.verification.timeouts: a wall-clock limit on a call, from any thread."""

from __future__ import annotations

import threading
import time

import pytest

from arborl.components.verification.timeouts import CallTimeout, call_with_timeout


def test_returns_the_value_and_raises_the_exception():
    assert call_with_timeout(lambda a, b=0: a + b, 5, "add", 2, b=3) == 5
    with pytest.raises(KeyError, match="k"):
        call_with_timeout({}.__getitem__, 5, "lookup", "k")


def test_an_overrun_raises_naming_the_callable_and_is_abandoned():
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(CallTimeout, match=r"slow did not return within 0\.1 s \(verify\.timeout_s\)"):
        call_with_timeout(release.wait, 0.1, "slow", 10)
    assert time.monotonic() - started < 5
    release.set()


def test_system_exit_in_the_callable_does_not_end_the_caller():
    def leave():
        raise SystemExit(3)

    with pytest.raises(RuntimeError, match="quits raised SystemExit: 3"):
        call_with_timeout(leave, 5, "quits")


def test_works_from_a_worker_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(call_with_timeout(len, 5, "len", "abc")))
    t.start()
    t.join()
    assert out == [3]
