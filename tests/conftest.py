"""The `slow` tier: flow, server, browser and container tests (every test under tests/flows and tests/integration,
and any test that starts a Prefect server, an S3 server, a browser or a container; a test that gets the S3 server
through a parametrized fixture is known by its `s3` id) are marked `slow` here; tests that start
processes (distributed ranks, stage subprocesses) carry `@pytest.mark.slow` themselves. `make test-fast`
(`pytest -m "not slow"`) leaves them out; `make test`, what CI runs, is the whole suite but for the `container`
tests (they build an image and need podman): those run only when the `-m` expression names them
(`make test-container`, `pytest -m container`)."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SLOW_DIRS = {"flows", "integration"}
SLOW_FIXTURES = {"prefect_server", "s3_bucket", "browser", "chromium", "container_image"}
SLOW_PARAMS = {"s3"}  # ids of parameters that start moto's S3 server (`root` fixtures over local and s3)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "container" not in (config.getoption("markexpr") or ""):
        left_out = [item for item in items if item.get_closest_marker("container")]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if not item.get_closest_marker("container")]
    for item in items:
        try:
            top = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        callspec = getattr(item, "callspec", None)
        ids = set(callspec.id.split("-")) if callspec is not None else set()
        if top in SLOW_DIRS or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or SLOW_PARAMS & ids or \
                "browser" in item.name or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
