"""Settings whose valid values a registry of the domain knows: reward functions (verification/rewards.py) and
advantage estimators (advantages/registry.py).

The config imports neither. Each registry registers its checks here when it is imported (the `arborl.components`
package imports both), and the config's validators call them, so a wrong name still fails when the config is
loaded, with the key in the message. A key nobody registered a check for is an error, not a pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_VALUE_CHECKS: dict[str, Callable[[Any], None]] = {}
_CONFIG_CHECKS: dict[str, Callable[[Any], None]] = {}


def register_value(key: str) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Decorator: `check(value)` raises ValueError when `value` is not valid for the dotted config `key`."""

    def add(check: Callable[[Any], None]) -> Callable[[Any], None]:
        _VALUE_CHECKS[key] = check
        return check

    return add


def register_config(name: str) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Decorator: `check(cfg)` raises ValueError when a registered choice does not fit other settings of `cfg`."""

    def add(check: Callable[[Any], None]) -> Callable[[Any], None]:
        _CONFIG_CHECKS[name] = check
        return check

    return add


def check_value(key: str, value: Any) -> Any:
    """`value` when the registry behind `key` accepts it; its ValueError otherwise."""
    if key not in _VALUE_CHECKS:
        raise RuntimeError(f"no registry checks {key!r}: import arborl.components (it registers them)")
    _VALUE_CHECKS[key](value)
    return value


def check_config(cfg: Any) -> None:
    """Run every registered check across settings on the validated `cfg`."""
    for check in _CONFIG_CHECKS.values():
        check(cfg)
