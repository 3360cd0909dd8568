"""Dated data snapshots: `latest` and named resolution, the files read from a snapshot folder, clear errors naming
the URI, on a local folder and on S3 (moto's server on 127.0.0.1), and the prepare stage reading a snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from arborl.components.artifacts import storage
from arborl.components.config import ConfigError, load_config
from arborl.components.data import snapshots
from arborl.components.data.export import export_snapshot
from arborl.components.stages import prepare

ROOT = Path(__file__).resolve().parents[3]
MICRO = ROOT / "configs" / "micro.yaml"
PARQUET = ["data.source=parquet", "search.backend=http", "search.url=http://127.0.0.1:9", "warmstart.enabled=false",
           "model.path=unused"]


def _cfg(root: str, snapshot: str = "latest", *extra: str):
    return load_config(MICRO, [*PARQUET, f"data.snapshot_root={root}", f"data.snapshot={snapshot}", *extra])


def _snapshot(root: str, name: str, files: tuple[str, ...] = ("train.parquet", "val.parquet", "test.parquet")) -> None:
    for f in files:
        storage.write_bytes(storage.join(root, name, f), b"x")


def test_latest_is_the_greatest_folder_name_and_a_named_snapshot_is_kept(tmp_path):
    root = str(tmp_path / "nq")
    for name in ("2026-11-16", "2026-11-30", "2026-11-23"):
        _snapshot(root, name)
    (tmp_path / "nq" / "_tmp-upload").mkdir()  # hidden and helper entries are no snapshots
    (tmp_path / "nq" / "README.txt").write_text("not a folder")
    assert snapshots.list_snapshots(root) == ["2026-11-16", "2026-11-23", "2026-11-30"]

    latest = snapshots.resolve_snapshot(_cfg(root))
    assert latest.data.snapshot == "2026-11-30"
    named = snapshots.resolve_snapshot(_cfg(root, "2026-11-23"))
    assert named.data.snapshot == "2026-11-23"
    # the concrete name is in the prepare stage's config hash: another snapshot is another prepare output
    assert prepare.config_hash(latest) != prepare.config_hash(named)
    assert prepare.config_hash(latest) == prepare.config_hash(snapshots.resolve_snapshot(latest))

    files = snapshots.data_files(named.data)
    assert files == {s: [f"{root}/2026-11-23/{s}.parquet"] for s in ("train", "val", "test")}
    assert snapshots.data_uri(named.data) == f"{root}/2026-11-23"
    assert snapshots.snapshot_name(named.data) == "2026-11-23"


def test_explicit_file_names_are_relative_to_the_snapshot_and_a_missing_val_file_means_no_val(tmp_path):
    root = str(tmp_path / "nq")
    _snapshot(root, "w1", ("train-a.parquet", "train-b.parquet", "test.parquet"))
    cfg = snapshots.resolve_snapshot(_cfg(root, "latest", "data.train_files=[train-a.parquet, train-b.parquet]"))
    assert snapshots.data_files(cfg.data) == {
        "train": [f"{root}/w1/train-a.parquet", f"{root}/w1/train-b.parquet"], "val": [],
        "test": [f"{root}/w1/test.parquet"]}


def test_errors_name_the_uri(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(snapshots.SnapshotError, match=f"data.snapshot_root '{missing}': no such folder"):
        snapshots.resolve_snapshot(_cfg(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(snapshots.SnapshotError, match=f"'{empty}' holds no snapshot folders"):
        snapshots.resolve_snapshot(_cfg(str(empty)))
    root = str(tmp_path / "nq")
    _snapshot(root, "2026-11-23")
    with pytest.raises(snapshots.SnapshotError, match=f"no folder {root}/2026-12-07 .*present: 2026-11-23"):
        snapshots.resolve_snapshot(_cfg(root, "2026-12-07"))
    # a snapshot root with the synthetic source, or a path as snapshot name, is a config error naming the key
    with pytest.raises(ConfigError, match="data.snapshot_root is set but data.source is 'synthetic'"):
        load_config(MICRO, [f"data.snapshot_root={root}"])
    with pytest.raises(ConfigError, match="data.snapshot must be a snapshot folder's name"):
        _cfg(root, "../other")


def test_snapshots_on_s3(s3_bucket):
    bucket, _ = s3_bucket
    root = f"{bucket}/nq"
    _snapshot(root, "2026-11-23")
    assert snapshots.resolve_snapshot(_cfg(root)).data.snapshot == "2026-11-23"
    _snapshot(root, "2026-11-30")  # a new week's snapshot shows without a new process
    cfg = snapshots.resolve_snapshot(_cfg(root))
    assert cfg.data.snapshot == "2026-11-30"
    assert snapshots.data_files(cfg.data)["train"] == [f"{root}/2026-11-30/train.parquet"]
    with pytest.raises(snapshots.SnapshotError, match=f"{bucket}/missing"):
        snapshots.resolve_snapshot(_cfg(f"{bucket}/missing"))


def test_prepare_reads_the_resolved_snapshot_and_records_its_files(tmp_path):
    root = str(tmp_path / "snaps")
    micro = load_config(MICRO)
    export_snapshot(micro, f"{root}/2026-11-23", parts=2, part=0)
    export_snapshot(micro, f"{root}/2026-11-30", parts=2, part=1)
    cfg = snapshots.resolve_snapshot(_cfg(root))
    result = prepare.run(cfg, {}, str(tmp_path / "prepare"))
    assert result.metrics["train_prompts"] == 30 and result.metrics["val_prompts"] == 8
    world = storage.read_json(str(tmp_path / "prepare" / "world.json"))
    assert world["files"]["train"] == [f"{root}/2026-11-30/train.parquet"]
