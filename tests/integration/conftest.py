"""Fixtures of the integration tests: the real servers of tests/integration/servers.py.

Under CI (env CI set) a missing PostgreSQL fails the tests; elsewhere they are skipped with the reason.
"""

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `tests.integration.servers` imports by path
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from tests.integration import servers  # noqa: E402


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def service_stack(tmp_path_factory) -> Iterator[servers.Stack]:
    """PostgreSQL, moto S3, MLflow and Prefect servers on PostgreSQL, and a process worker of `arborl-process`
    started in the repository root with ARBORL_HOME set to it (prefect.yaml's pull step changes into
    $ARBORL_HOME); torn down after the session."""
    if servers.pg_bindir() is None:
        reason = "PostgreSQL is not installed (apt-get install -y postgresql)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it (.ci/run does)")
        pytest.skip(f"{reason}; CI runs this test")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request at INFO
    with servers.stack(tmp_path_factory.mktemp("servers"), worker_cwd=ROOT,
                       worker_env={"ARBORL_HOME": str(ROOT)}) as stack:
        yield stack
