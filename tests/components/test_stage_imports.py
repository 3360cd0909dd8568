"""The stages import without Prefect, MLflow, peft or matplotlib: the vLLM sampling image has none of them
(docs/design.md, Stage contract: components are importable without Prefect)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
for name in ("prefect", "mlflow", "peft", "matplotlib"):
    sys.modules[name] = None  # any import of them now fails
from arborl.components.stages import STAGES
import arborl.flows.cli
print(sorted(STAGES))
"""


@pytest.mark.slow  # starts processes
def test_stages_and_cli_import_without_orchestration_packages(repo_root):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sample" in out.stdout and "train" in out.stdout
