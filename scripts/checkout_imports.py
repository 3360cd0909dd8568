"""Make `arborl.components` / `arborl.flows` importable from this checkout without installing it (the GPU check
scripts run on machines where only torch and transformers are installed). A no-op where arborl is installed."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_checkout() -> None:
    if importlib.util.find_spec("arborl") is not None:
        return
    root = types.ModuleType("arborl")
    root.__path__ = []  # a package with no folder of its own: its two subpackages are mapped below
    sys.modules["arborl"] = root
    for name in ("components", "flows"):
        spec = importlib.util.spec_from_file_location(
            f"arborl.{name}", ROOT / name / "__init__.py", submodule_search_locations=[str(ROOT / name)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(root, name, module)
