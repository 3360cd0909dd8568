"""Run a reward call with a wall-clock limit, from any thread.

The call runs in a daemon worker thread; the caller waits at most `timeout_s`. A call that overruns is
abandoned, not killed (Python cannot stop a thread): it finishes in the background, and a daemon thread never
holds up the interpreter's exit. Signal-based timeouts are no option here: they only work in the main thread,
and stages may run in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class CallTimeout(TimeoutError):
    """A reward call that did not return within its limit; the message names the callable."""


def call_with_timeout(fn: Callable[..., T], timeout_s: float | None, name: str, /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, or CallTimeout naming `name` when it has not returned after `timeout_s` seconds.
    `timeout_s=None` calls `fn` directly, in this thread: for callers that bound the call themselves (a worker
    process that is killed past the limit, `verification/isolated.py`).

    An exception of `fn` is raised here; a BaseException other than Exception (SystemExit, KeyboardInterrupt
    raised by `fn` in its thread) comes back as a RuntimeError, so that a reward cannot end the process.
    """
    if timeout_s is None:
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name=f"reward {name}", daemon=True).start()
    if not done.wait(timeout_s):
        raise CallTimeout(f"{name} did not return within {timeout_s:g} s (verify.timeout_s)")
    if "error" in box:
        exc = box["error"]
        if not isinstance(exc, Exception):
            raise RuntimeError(f"{name} raised {type(exc).__name__}: {exc}") from exc
        raise exc
    return box["value"]
