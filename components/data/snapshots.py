"""Dated data snapshots: `data.snapshot_root` is a folder (local or s3://) whose sub-folders are snapshots of the
same data set, e.g. `s3://bucket/nq/2026-11-23/`, `s3://bucket/nq/2026-11-30/`, each holding verl / Search-R1
Parquet files. `data.snapshot` names one, or `latest`: the greatest name present (ISO dates sort in time order).

A run resolves `latest` once, when it starts (`resolve_snapshot`), into the concrete folder name in its config, so
the prepare stage's config hash names the snapshot it read and a resumed run keeps reading the same one.
"""

from __future__ import annotations

from arborl.components.artifacts import storage
from arborl.components.config import Config, DataConfig

LATEST = "latest"
DEFAULT_FILES = {"train": "train.parquet", "val": "val.parquet", "test": "test.parquet"}
NO_SNAPSHOT = "none"  # recorded for runs without data.snapshot_root (the synthetic world, explicit files)


class SnapshotError(ValueError):
    """The snapshot root or the named snapshot cannot be used; the message names the URI."""


def list_snapshots(root: str) -> list[str]:
    """Names of the snapshot folders directly under `root`, sorted; hidden (`.`/`_`) entries are ignored.

    Raises SnapshotError naming `root` when it does not exist or is not a folder."""
    fs, path = storage.filesystem(root)
    fs.invalidate_cache(path)  # a snapshot written since this process last listed the root must show
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        entries = None
    if entries is None or (not entries and not fs.isdir(path)):
        raise SnapshotError(f"data.snapshot_root {root!r}: no such folder")
    names = []
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "directory" and name and not name.startswith((".", "_")):
            names.append(name)
    return sorted(names)


def snapshot_uri(root: str, name: str) -> str:
    """The folder URI of snapshot `name` under `root`."""
    return storage.join(root.rstrip("/"), name)


def resolve_name(root: str, snapshot: str) -> str:
    """The concrete snapshot folder name for `snapshot` (a name or `latest`) under `root`; SnapshotError naming
    the URI when the root is missing, holds no snapshots, or lacks the named one."""
    names = list_snapshots(root)
    if snapshot == LATEST:
        if not names:
            raise SnapshotError(f"data.snapshot_root {root!r} holds no snapshot folders")
        return names[-1]
    if snapshot not in names:
        shown = ", ".join(names[-5:]) if names else "none"
        raise SnapshotError(f"data.snapshot {snapshot!r}: no folder {snapshot_uri(root, snapshot)} (snapshots "
                            f"present: {shown})")
    return snapshot


def resolve_snapshot(cfg: Config) -> Config:
    """`cfg` with `data.snapshot` resolved to the concrete folder name (unchanged without data.snapshot_root)."""
    data = cfg.data
    if data.snapshot_root is None:
        return cfg
    name = resolve_name(data.snapshot_root, data.snapshot)
    if name == data.snapshot:
        return cfg
    return cfg.model_copy(update={"data": data.model_copy(update={"snapshot": name})})


def data_files(data: DataConfig) -> dict[str, list[str]]:
    """The Parquet files to read per split: `data.*_files` as given, or, with a snapshot root, relative to the
    snapshot folder (`train.parquet`, `val.parquet`, `test.parquet` when a list is empty; a missing default
    val file means no val rows). `latest` is resolved here when the config still says it (a stage run alone)."""
    given = {"train": list(data.train_files), "val": list(data.val_files), "test": list(data.test_files)}
    if data.snapshot_root is None:
        return given
    name = data.snapshot if data.snapshot != LATEST else resolve_name(data.snapshot_root, LATEST)
    folder = snapshot_uri(data.snapshot_root, name)
    if not storage.exists(folder):
        raise SnapshotError(f"data.snapshot {name!r}: no folder {folder}")
    files = {}
    for split, names in given.items():
        if names:
            files[split] = [storage.join(folder, n) for n in names]
        elif split != "val" or storage.exists(storage.join(folder, DEFAULT_FILES[split])):
            files[split] = [storage.join(folder, DEFAULT_FILES[split])]
        else:
            files[split] = []
    return files


def data_uri(data: DataConfig) -> str:
    """Where a run's data came from, for lineage: the snapshot folder, the Parquet files, or `synthetic`."""
    if data.source != "parquet":
        return "synthetic"
    if data.snapshot_root is not None:
        return snapshot_uri(data.snapshot_root, data.snapshot)
    text = ",".join(data.train_files + data.val_files + data.test_files)
    return text if len(text) <= 1000 else text[:997] + "..."


def snapshot_name(data: DataConfig) -> str:
    """The snapshot a run read (`none` without data.snapshot_root)."""
    return data.snapshot if data.snapshot_root is not None else NO_SNAPSHOT
