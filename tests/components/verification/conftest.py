"""The `reward_fns` fixture: this folder on sys.path, so `user_reward_fns:<name>` imports."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture
def reward_fns(monkeypatch):
    """The test callables module (`user_reward_fns`), importable by path; its CALLS log starts empty."""
    monkeypatch.syspath_prepend(str(HERE))
    import user_reward_fns

    user_reward_fns.CALLS.clear()
    return user_reward_fns
