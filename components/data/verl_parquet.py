"""verl / Search-R1 Parquet prompt files, read unchanged into rows of the prompts artifact.

A file holds one prompt per row: `data_source` (string), `prompt` (chat messages, structs of `role` and
`content`), `ability` (string, optional), `reward_model` (struct of `style` and `ground_truth`; the ground truth
is a struct holding `target` — a list of strings or one string — or itself a string or a list of strings) and
`extra_info` (struct or JSON string, optional). Files are streamed in record batches through fsspec (local paths
and s3:// URIs). A row that cannot be used is skipped and reported as a bad row `{"file", "row", "reason"}`; a
missing file, one that is not Parquet, or one without a required column is an error naming the file.

A row's `prompt_id` is `<split>-<data_source>-<extra_info.index>` when `extra_info` has an index, else
`<split>-<file stem>:<row>` (a stem already used by an earlier file of the split gets `.<position in the list>`);
an id seen before in its split makes the row bad.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from arborl.components.artifacts import storage

log = logging.getLogger("arborl.data")

REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")
OPTIONAL_COLUMNS = ("ability", "extra_info")
SHOWN_BAD_ROWS = 5  # bad rows an error message names


class UnusableRow(ValueError):
    """A row that cannot be used; the message is the reason recorded with its bad row."""


@dataclass
class ReadResult:
    """Rows of the prompts artifact, the bad rows skipped, and how many rows the files held in all."""

    rows: list[dict] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)
    total: int = 0

    def counts(self) -> dict[str, int]:
        """Usable rows per split."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["split"]] = out.get(row["split"], 0) + 1
        return out


def iter_rows(uri: str, batch_rows: int = 4096) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index, row as a dict of the verl columns present) of the Parquet file `uri`, read `batch_rows` rows
    at a time. A missing file raises FileNotFoundError; an unreadable one, or one without a required column,
    `storage.ArtifactError`; both name `uri`."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"data file not found: {uri}")
    with fs.open(path, "rb") as fh:
        try:
            parquet = pq.ParquetFile(fh)
        except pa.ArrowException as exc:
            raise storage.ArtifactError(f"{uri}: not a Parquet file or truncated ({exc})") from exc
        names = parquet.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise storage.ArtifactError(
                f"{uri}: missing required column{'s' if len(missing) > 1 else ''} {', '.join(missing)} (a verl / "
                f"Search-R1 prompt file has {', '.join(REQUIRED_COLUMNS)}; this one has {', '.join(names)})")
        columns = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in names]
        index = 0
        try:
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                for raw in batch.to_pylist():
                    yield index, raw
                    index += 1
        except pa.ArrowException as exc:
            raise storage.ArtifactError(f"{uri}: cannot read row {index} onwards ({exc})") from exc


def _messages(prompt: Any) -> list[dict[str, str]]:
    if not isinstance(prompt, list):
        raise UnusableRow(f"prompt is not a list of chat messages (got {type(prompt).__name__})")
    if not prompt:
        raise UnusableRow("empty prompt")
    out = []
    for i, message in enumerate(prompt):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise UnusableRow(f"prompt message {i} has no string role and content")
        out.append({"role": role, "content": content})
    return out


def _targets(ground_truth: Any) -> list[str]:
    if isinstance(ground_truth, dict):
        if ground_truth.get("target") is None:
            raise UnusableRow("reward_model.ground_truth has no target")
        ground_truth = ground_truth["target"]
    if ground_truth is None:
        raise UnusableRow("missing ground truth")
    targets = [ground_truth] if isinstance(ground_truth, str) else ground_truth
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise UnusableRow(f"ground truth is not a string or a list of strings (got {ground_truth!r:.80})")
    if not targets or not all(t.strip() for t in targets):
        raise UnusableRow("empty ground truth")
    return targets


def _extra_info(value: Any) -> dict[str, Any]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise UnusableRow("extra_info is not valid JSON") from None
    if not isinstance(value, dict):
        raise UnusableRow(f"extra_info is not a struct or a JSON object (got {type(value).__name__})")
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def convert_row(raw: dict[str, Any], split: str, fallback_id: str) -> dict[str, Any]:
    """The prompts-artifact row of one verl row; `fallback_id` is its id without an `extra_info.index`.

    Raises UnusableRow with the reason when the row cannot be used."""
    source = raw.get("data_source")
    if not isinstance(source, str) or not source.strip():
        raise UnusableRow("data_source is not a non-empty string")
    messages = _messages(raw.get("prompt"))
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise UnusableRow("prompt has no user message")
    if not users[-1].strip():
        raise UnusableRow("the last user message is empty")
    reward_model = raw.get("reward_model")
    if not isinstance(reward_model, dict):
        raise UnusableRow(f"reward_model is not a struct (got {type(reward_model).__name__})")
    targets = _targets(reward_model.get("ground_truth"))
    ability = raw.get("ability")
    if ability is not None and not isinstance(ability, str):
        raise UnusableRow(f"ability is not a string (got {type(ability).__name__})")
    extra = _extra_info(raw.get("extra_info"))
    index = extra.get("index")
    has_index = (isinstance(index, int) and not isinstance(index, bool)) or (isinstance(index, str) and index)
    return {
        "prompt_id": f"{split}-{source}-{index}" if has_index else f"{split}-{fallback_id}",
        "data_source": source,
        "prompt": users[-1],
        "messages": _dumps(messages),
        "ability": ability or "",
        "reward_model": _dumps(reward_model),
        "ground_truth": targets,
        "split": split,
        "extra_info": _dumps(extra),
    }


def _stem(uri: str) -> str:
    return PurePosixPath(str(uri).rstrip("/")).stem or "data"


def read_files(files: dict[str, list[str]], batch_rows: int = 4096) -> ReadResult:
    """Read the verl / Search-R1 Parquet files of each split (`{"train": [uri, ...], ...}`) into prompts rows;
    unusable rows and duplicate ids become bad rows. Errors (missing file or column) name the file."""
    result = ReadResult()
    for split, uris in files.items():
        first_seen: dict[str, tuple[str, int]] = {}
        stems: set[str] = set()
        for position, uri in enumerate(uris):
            stem = _stem(uri)
            while stem in stems:  # e.g. two files named train.parquet in different folders
                stem = f"{stem}.{position}"
            stems.add(stem)
            for index, raw in iter_rows(uri, batch_rows):
                result.total += 1
                try:
                    row = convert_row(raw, split, f"{stem}:{index}")
                    earlier = first_seen.get(row["prompt_id"])
                    if earlier is not None:
                        raise UnusableRow(f"duplicate prompt_id {row['prompt_id']!r} (first at {earlier[0]} "
                                          f"row {earlier[1]})")
                except UnusableRow as exc:
                    result.bad.append({"file": uri, "row": index, "reason": str(exc)})
                    continue
                first_seen[row["prompt_id"]] = (uri, index)
                result.rows.append(row)
    return result


def describe_bad(bad: list[dict], shown: int = SHOWN_BAD_ROWS) -> str:
    """The first `shown` bad rows as `file row N: reason; ...`."""
    text = "; ".join(f"{b['file']} row {b['row']}: {b['reason']}" for b in bad[:shown])
    return text + (f"; and {len(bad) - shown} more" if len(bad) > shown else "")


def check_bad_rows(result: ReadResult, max_fraction: float) -> None:
    """ValueError naming the first bad rows when more than `max_fraction` of all rows read are bad; otherwise one
    warning line naming them, when there are any."""
    if result.bad and len(result.bad) > max_fraction * result.total:
        raise ValueError(f"{len(result.bad)} of {result.total} data rows are unusable, more than "
                         f"data.max_bad_fraction={max_fraction}: {describe_bad(result.bad)}")
    if result.bad:  # never dropped silently
        log.warning("%d of %d data rows are unusable and left out (within data.max_bad_fraction=%s): %s",
                    len(result.bad), result.total, max_fraction, describe_bad(result.bad))
