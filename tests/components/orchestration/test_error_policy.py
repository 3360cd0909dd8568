"""components.error_policy: transient failures are retried, deterministic ones are not."""

from __future__ import annotations

import httpx

from arborl.components.config import ConfigError
from arborl.components.orchestration.error_policy import is_transient
from arborl.components.verification.scoring import RewardErrors


class _Status(Exception):
    def __init__(self, code: int):
        super().__init__(f"HTTP {code}")
        self.status_code = code


def test_network_errors_timeouts_and_5xx_are_transient():
    assert is_transient(ConnectionRefusedError("refused"))
    assert is_transient(TimeoutError())
    assert is_transient(httpx.ConnectTimeout("slow"))
    assert is_transient(_Status(503)) and not is_transient(_Status(404))
    try:  # wrapped: what a stage raises from a network error
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as inner:
            raise RuntimeError("retriever failed") from inner
    except RuntimeError as exc:
        assert is_transient(exc)


def test_deterministic_errors_are_not():
    for exc in (ValueError("bad row 3"), KeyError("prompt_id"), FileNotFoundError("no model"),
                ConfigError("x.yaml: unknown key"), RewardErrors("24 of 24 reward calls failed"), None):
        assert not is_transient(exc)
