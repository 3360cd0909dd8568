"""Reading a config: YAML 1.2 files (duplicate keys refused), JSON, S3 URIs and `key.sub=value` overrides,
validated into `Config` with errors that name the file and the key."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from arborl.components.config.schema import Config


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the file and key."""


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core scalars instead of YAML 1.1's: integers are decimal digits only
    (no sexagesimal `1:30` = 90, no octal `010` = 8, no `0x10`), booleans are only true/false (not yes/no/on/off),
    floats include `1e-3` without a dot; and a mapping that repeats a key is an error rather than the last one
    silently winning."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_YAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                                                              "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))
_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
_YAMLLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node), 10))
INT_LIMIT = 2**63  # integers are 64-bit signed where they go (seeds, counts): anything larger is refused


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 (a safe loader)


def _check_ints(data: Any, source: str, path: str = "") -> None:
    """Refuse an integer outside the 64-bit signed range, naming its key."""
    if isinstance(data, dict):
        for key, value in data.items():
            _check_ints(value, source, f"{path}.{key}" if path else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _check_ints(value, source, f"{path}[{i}]")
    elif isinstance(data, int) and not isinstance(data, bool) and not -INT_LIMIT <= data < INT_LIMIT:
        raise ConfigError(f"{source}: key {path!r}: {data} is outside the 64-bit integer range")


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` → ("a.b", value) with the value parsed as YAML (so 3, 0.1, true, null, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, _yaml(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (default `configs/tiny.yaml`) and apply `key.sub=value` overrides. A `.json` file (e.g. a
    run's resolved `<run root>/config.json`) is read as JSON; a URI (s3://...) is read through artifacts/storage.py,
    so stage containers share one resolved config.

    Raises ConfigError naming the file and the offending key.
    """
    if path is not None and "://" in str(path):
        path = str(path)
        text = _read_uri(path)
    else:
        path = Path(path) if path is not None else DEFAULT_CONFIG
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if str(path).endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    else:
        try:
            data = _yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; a config states at least one section (see configs/tiny.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value, str(path))
    return config_from_dict(data, source=str(path))


def _read_uri(uri: str) -> str:
    from arborl.components.artifacts import storage

    try:
        if not storage.exists(uri):
            raise ConfigError(f"config file not found: {uri}")
        return storage.read_bytes(uri).decode()
    except (OSError, ValueError) as exc:  # no such bucket, no credentials, not UTF-8
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{uri}: cannot read the config: {exc}") from None


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    _check_ints(data, source)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key {key!r}")
            elif len(err["loc"]) > 1 or err["type"] != "value_error":
                problems.append(f"key {key!r}: {err['msg'].removeprefix('Value error, ')}")
            else:  # a check across the keys of a section or of sections: its message names them
                problems.append(err["msg"].removeprefix("Value error, "))
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
