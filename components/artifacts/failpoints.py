"""Fault injection for crash-safety tests: `failpoint(name)` kills this process with SIGKILL (as `kill -9` would)
when the environment variable `ARBORL_FAILPOINT` equals `name`, and does nothing otherwise (one environment
lookup). Placed at the points between two writes that a crash must not leave half done, e.g.
`registry.after_register` (a model version registered, its tags and alias not yet set); `tests/flows/` runs a
command with the variable set, then reruns it without.
"""

from __future__ import annotations

import os
import signal

ENV = "ARBORL_FAILPOINT"


def failpoint(name: str) -> None:
    """Die at once, without cleanup (no `finally`, no atexit, no flush), when `$ARBORL_FAILPOINT` is `name`."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
