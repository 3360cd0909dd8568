"""Stages outside the flow's process through the real flow (configs/micro.yaml, a real Prefect server): every
stage as a child `arborl stage` process reading the run's config.json, and the sample shards on a local Dask
cluster (real scheduler and worker processes on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path

from arborl.components.artifacts import schemas, storage
from arborl.components.config import load_config

ROOT = Path(__file__).resolve().parents[2]
# one iteration, no MLflow; one torch thread so results compare exactly across processes
QUICK = ("run.iterations=1", "tracking.enabled=false", "registry.enabled=false", "run.threads=1")


def micro(output_root: Path, *overrides: str):
    return load_config(ROOT / "configs" / "micro.yaml", [f"run.output_root={output_root}", *overrides])


def as_json(value) -> str:
    """Compared as JSON text, so NaN (e.g. the log-probability of a tool-output token) equals NaN."""
    return json.dumps(value, sort_keys=True)


def rows(uri: Path, drop: tuple[str, ...] = ()) -> list[str]:
    return [as_json({k: v for k, v in r.items() if k not in drop}) for r in storage.read_parquet(str(uri)).to_pylist()]


def test_subprocess_executor_gives_the_in_process_results(tmp_path, prefect_server):
    from arborl.flows.pipeline import train_pipeline

    inprocess = train_pipeline(micro(tmp_path / "inprocess", *QUICK).model_dump(mode="json"))
    cfg = micro(tmp_path / "subprocess", *QUICK, "orchestration.executor=subprocess")
    summary = train_pipeline(cfg.model_dump(mode="json"))

    a, b = tmp_path / "inprocess" / "micro", tmp_path / "subprocess" / "micro"
    assert json.loads((b / "config.json").read_text())["orchestration"]["executor"] == "subprocess"
    it = Path("iter_001")
    assert rows(b / it / "sample" / schemas.NODES_FILE) == rows(a / it / "sample" / schemas.NODES_FILE)
    assert rows(b / it / "label" / schemas.ADVANTAGES_FILE) == rows(a / it / "label" / schemas.ADVANTAGES_FILE)
    for key in ("final", "warmstart", "final_by_hops", "history"):
        assert as_json(summary[key]) == as_json(inprocess[key]), key
    assert summary["model"] == str(b / it / "train")
    for stage in ("prepare", "warmstart", "iter_001/sample", "iter_001/train", "iter_001/eval"):
        metrics = [json.loads((root / stage / "_manifest.json").read_text())["metrics"] for root in (a, b)]
        assert as_json(metrics[0]) == as_json(metrics[1]), stage


def test_sample_shards_on_a_dask_cluster_give_the_unsharded_trees(tmp_path, prefect_server):
    """`orchestration.dask_address`: the two shards run on the workers of a real local Dask cluster."""
    from distributed import Client, LocalCluster, get_task_stream

    from arborl.components.stages import sample
    from arborl.flows.pipeline import train_pipeline

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        address = cluster.scheduler_address
        cfg = micro(tmp_path / "runs", *QUICK, "sampling.shards=2", f"orchestration.dask_address={address}")
        with get_task_stream(client) as stream:  # what the cluster's workers ran meanwhile
            train_pipeline(cfg.model_dump(mode="json"))
        workers = set(client.scheduler_info()["workers"])
    run_root = tmp_path / "runs" / "micro"
    out = run_root / "iter_001" / "sample"
    assert address.startswith("tcp://127.0.0.1:")
    ran = {t["key"]: t["worker"] for t in stream.data}
    assert len(ran) == 2 and set(ran.values()) <= workers, ran
    assert json.loads((out / "_manifest.json").read_text())["metrics"]["shards"] == 2
    assert sorted(p.name for p in (run_root / "iter_001" / "sample-shards").iterdir()) == [
        "part-00000-of-00002", "part-00001-of-00002"]

    # shards and the whole batch score prompts in different batches: log-probabilities differ in the last bits
    one = micro(tmp_path / "runs", *QUICK)
    whole = sample.run(one, {"model": str(run_root / "warmstart"), "world": str(run_root / "prepare")},
                       str(tmp_path / "unsharded"), iteration=1)
    assert rows(out / schemas.NODES_FILE, ("logprobs",)) == rows(Path(whole.outputs["nodes"]), ("logprobs",))
