"""User reward callables by import path, in either signature people already have.

* TRL: `fn(prompts, completions, **kwargs) -> list[float]`, batched. `prompts` and `completions` are lists of
  strings (prompt text, the agent's response); the keyword arguments are dataset columns, one list entry per
  completion: `ground_truth` (list of gold answers), `data_source`, `extra_info` (dict), `reward_model`
  (dict with `style` and `ground_truth`), and `ability` / `messages` where the prompts have them.
* verl: `compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict`, one call per
  response, by keyword; `ground_truth` is the prompt's `reward_model.ground_truth` object (e.g.
  `{"target": [...]}`); a dict return has `score` and may have `acc` (the leaf's correctness).

The signature is told from the parameter names (`completions` → TRL, `solution_str` → verl); a callable that
cannot be imported, is not callable, has neither signature or requires an argument no call supplies is refused
with a ValueError naming the import path. This module imports no config, so the config can use it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arborl.components.verification.timeouts import call_with_timeout

TRL, VERL = "trl", "verl"
TRL_ARGS = ("prompts", "completions", "ground_truth", "data_source", "extra_info", "reward_model")  # always given
TRL_OPTIONAL = ("ability", "messages")  # given where the prompts have these columns
VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")
ACC_CORRECT = 0.5  # a verl `acc` at or above this (True, 1) marks the leaf correct


@dataclass(frozen=True)
class UserReward:
    """A user callable resolved from `path`: its signature `style` (TRL or verl) and the keyword names it takes
    (`params`; None when it takes **kwargs, i.e. every argument)."""

    path: str
    fn: Callable[..., Any]
    style: str
    params: frozenset[str] | None

    def keywords(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of `values` this callable accepts."""
        return dict(values) if self.params is None else {k: v for k, v in values.items() if k in self.params}


def _load_file(file: str) -> Any:
    """The module of a Python file (relative to the working directory), loaded once under a name derived from its
    absolute path; FileNotFoundError naming it when it is not there."""
    source = Path(file).expanduser().resolve()
    if not source.is_file():
        raise FileNotFoundError(f"no file {source}")
    name = "arborl_user_" + hashlib.sha256(str(source).encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: pickling its functions by reference needs it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_callable(path: str) -> Callable[..., Any]:
    """The object at `package.module:function` (or dotted `package.module.function`), or at `path/to/file.py:function`
    (a file, relative to the working directory); ValueError naming the path when the module cannot be imported,
    lacks the name, or the object is not callable."""
    module_name, sep, attr = path.rpartition(":") if path.partition(":")[0].endswith(".py") else path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path; write 'package.module:function' or 'file.py:function'")
    try:
        obj: Any = _load_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a config error naming the path
        raise ValueError(f"cannot import module {module_name!r} of {path!r} ({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{path!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable (it is a {type(obj).__name__})")
    return obj


def _signature_style(fn: Callable[..., Any], path: str) -> tuple[str, frozenset[str] | None]:
    """(TRL or verl, the keyword names `fn` takes or None for **kwargs); ValueError naming `path` otherwise."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r}: cannot read its signature ({exc})") from None
    params = list(sig.parameters.values())
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    expected = ("TRL's fn(prompts, completions, **kwargs) -> list[float] or verl's compute_score(data_source, "
                "solution_str, ground_truth, extra_info=None) -> float | dict")
    if "completions" in named and "solution_str" not in named:
        style, supplied = TRL, set(TRL_ARGS)
    elif "solution_str" in named and "completions" not in named:
        style, supplied = VERL, set(VERL_ARGS)
        if not var_kw and "ground_truth" not in named:
            raise ValueError(f"{path!r} {sig}: a verl reward takes solution_str and ground_truth (and may take "
                             "data_source and extra_info)")
    else:
        raise ValueError(f"{path!r} {sig} has neither reward signature: expected {expected}")
    unsupplied = sorted(required - supplied)
    if unsupplied:
        raise ValueError(f"{path!r} {sig} ({style} signature) requires {', '.join(unsupplied)}, which a reward call "
                         f"does not supply (it passes {', '.join(sorted(supplied))} by keyword)")
    return style, None if var_kw else frozenset(named)


def load_user_reward(path: str) -> UserReward:
    """Import `path` and tell its signature (see the module docstring); ValueError naming the path."""
    fn = import_callable(path)
    style, params = _signature_style(fn, path)
    return UserReward(path, fn, style, params)


def finite(value: Any, what: str) -> float:
    """`value` as a finite float (bools and numpy/torch scalars included); TypeError/ValueError naming `what`."""
    if not isinstance(value, numbers.Real) and callable(getattr(value, "item", None)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{what} is a {type(value).__name__} ({str(value)[:60]!r}), not a number")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{what} is {out}, not a finite number")
    return out


def call_verl(reward: UserReward, data_source: str, solution_str: str, ground_truth: Any,
              extra_info: Mapping[str, Any] | None,
              timeout_s: float | None) -> tuple[float, bool | None, dict[str, Any]]:
    """One verl call, bounded by `timeout_s` (None: not bounded here): (score, correctness from `acc` or None, the
    dict's other keys).

    Raises what the callable raises, CallTimeout, or TypeError/ValueError naming the path for a return that is
    not a finite number or a dict with a finite `score`."""
    kwargs = reward.keywords({"data_source": data_source, "solution_str": solution_str,
                              "ground_truth": ground_truth, "extra_info": extra_info})
    value = call_with_timeout(reward.fn, timeout_s, reward.path, **kwargs)
    if isinstance(value, Mapping):
        if "score" not in value:
            raise ValueError(f"{reward.path} returned a dict without 'score' (keys: {', '.join(map(str, value))})")
        score = finite(value["score"], f"{reward.path}'s 'score'")
        acc = None if "acc" not in value else finite(value["acc"], f"{reward.path}'s 'acc'") >= ACC_CORRECT
        return score, acc, {str(k): v for k, v in value.items() if k != "score"}
    return finite(value, f"{reward.path}'s return"), None, {}


def call_trl(reward: UserReward, prompts: Sequence[str], completions: Sequence[str],
             columns: Mapping[str, Sequence[Any]], timeout_s: float) -> list[tuple[float, str | None]]:
    """One batched TRL call, bounded by `timeout_s`: (reward, None) per completion, or (0.0, error text) for an
    entry that is not a finite number.

    Raises what the callable raises, CallTimeout, or TypeError/ValueError naming the path when the return is not
    a list of one number per completion."""
    kwargs = reward.keywords({"prompts": list(prompts), "completions": list(completions),
                              **{k: list(v) for k, v in columns.items()}})
    value = call_with_timeout(reward.fn, timeout_s, reward.path, **kwargs)
    if not isinstance(value, (list, tuple)) and callable(getattr(value, "tolist", None)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{reward.path} returned a {type(value).__name__}, not a list of {len(completions)} floats")
    if len(value) != len(completions):
        raise ValueError(f"{reward.path} returned {len(value)} rewards for {len(completions)} completions")
    out: list[tuple[float, str | None]] = []
    for i, v in enumerate(value):
        try:
            out.append((finite(v, f"{reward.path}'s reward [{i}]"), None))
        except (TypeError, ValueError) as exc:
            out.append((0.0, f"{type(exc).__name__}: {exc}"))
    return out
