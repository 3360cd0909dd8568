"""The Prefect flow end to end on configs/micro.yaml: a real Prefect server, a real SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from arborl.components.artifacts import storage
from arborl.components.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def micro(tmp_path: Path, *overrides: str):
    return load_config(ROOT / "configs" / "micro.yaml", [f"run.output_root={tmp_path / 'runs'}", *overrides])


def manifests(run_root: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(run_root)): p.stat().st_mtime_ns for p in run_root.rglob("_manifest.json")}


def crash_in_train(monkeypatch, cfg, iteration: int) -> None:
    """Run the pipeline of `cfg` with its train stage failing at `iteration`, as a crash there would."""
    from arborl.components.stages import STAGES
    from arborl.flows.pipeline import train_pipeline

    train_stage = STAGES["train"]

    def crashing_train(cfg, inputs, out, iteration, **kw):
        if iteration == failing:
            raise RuntimeError(f"killed in the train stage of iteration {failing}")
        return train_stage(cfg, inputs, out, iteration=iteration, **kw)

    failing = iteration
    monkeypatch.setitem(STAGES, "train", crashing_train)
    with pytest.raises(Exception, match=f"killed in the train stage of iteration {iteration}"):
        train_pipeline(cfg.model_dump(mode="json"))
    monkeypatch.setitem(STAGES, "train", train_stage)


def test_flow_runs_tracks_and_resumes(tmp_path, prefect_server):
    from arborl.flows.pipeline import train_pipeline

    cfg = micro(tmp_path)
    summary = train_pipeline(cfg.model_dump(mode="json"), str(ROOT / "configs" / "micro.yaml"))
    run_root = tmp_path / "runs" / "micro"

    on_disk = json.loads((run_root / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("test_em", "test_em_sampled", "val_em"):
        assert 0.0 <= on_disk["final"][key] <= 1.0
        assert 0.0 <= on_disk["warmstart"][key] <= 1.0
    assert on_disk["iterations"] == 2
    assert set(on_disk["stage_seconds"]) == {"prepare", "warmstart", "evaluate", "sample", "verify", "label", "train"}
    assert on_disk["config_hash"] == cfg.section_hash()
    assert [h["iteration"] for h in on_disk["history"]] == [1, 2]

    done = manifests(run_root)
    expected = {"prepare", "warmstart", "warmstart_eval"} | {
        f"iter_00{i}/{s}" for i in (1, 2) for s in ("sample", "verify", "label", "train", "eval")
    }
    assert set(done) == expected
    assert (run_root / "iter_002" / "train" / "model.safetensors").exists()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["sampling.trees_per_prompt"] == "2"
    assert run.data.params["advantage.estimator"] == "tree"
    reward_steps = [m.step for m in client.get_metric_history(run.info.run_id, "verify/reward_mean")]
    assert sorted(reward_steps) == [1, 2]
    assert {m.step for m in client.get_metric_history(run.info.run_id, "eval/test_em")} == {0, 1, 2}
    assert "train/loss" in run.data.metrics and "sample/generated_tokens" in run.data.metrics
    for budget_metric in ("sample/prefilled_tokens", "sample/chain_equivalents_per_prompt",
                          "sample/trajectories_per_chain_equivalent", "sample/round1_generated_tokens",
                          "sample/plan_trees_per_prompt", "sample/expansion_rounds_per_prompt",
                          "sample/bad_prompt_count"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, budget_metric)) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.json", "config_file"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config_file")] == ["config_file/micro.yaml"]

    # A crash after iteration 1: iteration 2's outputs are half-written (no manifests). Re-running the same
    # config redoes only those, in the same MLflow run.
    for stage in ("sample", "verify", "label", "train", "eval"):
        (run_root / "iter_002" / stage / "_manifest.json").unlink()
    before = manifests(run_root)
    summary2 = train_pipeline(cfg.model_dump(mode="json"))
    after = manifests(run_root)
    assert summary2["mlflow_run_id"] == summary["mlflow_run_id"]
    unchanged = {k for k in before if after[k] == before[k]}
    assert unchanged == set(before)  # iteration 1 and the warm start were skipped, not redone
    redone = {f"iter_002/{s}" for s in ("sample", "verify", "label", "train", "eval")}
    assert {k for k in after if k not in before} == redone
    assert summary2["final"] == summary["final"]  # same seed, same inputs: the redone iteration matches


def test_chain_baseline_is_one_override(tmp_path, prefect_server):
    from arborl.flows.pipeline import train_pipeline

    cfg = micro(tmp_path, "sampling.expansion_rounds=0", "sampling.trees_per_prompt=3", "advantage.estimator=grpo",
                "run.iterations=1", "tracking.enabled=false")
    summary = train_pipeline(cfg.model_dump(mode="json"))
    nodes = storage.read_parquet(str(tmp_path / "runs" / "micro" / "iter_001" / "sample" / "nodes.parquet")).to_pylist()
    leaves = [n for n in nodes if n["is_leaf"]]
    assert len(leaves) == cfg.sampling.prompts_per_iteration * 3  # one leaf per chain
    assert all(n["expansion_round"] == 0 for n in nodes)
    assert summary["mlflow_run_id"] is None


def test_a_run_reuses_a_warm_start_only_when_its_settings_match(tmp_path, prefect_server):
    from arborl.flows.pipeline import train_pipeline

    first = micro(tmp_path, "run.iterations=0", "tracking.enabled=false", "registry.enabled=false")
    train_pipeline(first.model_dump(mode="json"))
    source = str(tmp_path / "runs" / "micro")
    second = micro(tmp_path, "run.name=second", "run.iterations=1", "tracking.enabled=false",
                   "registry.enabled=false", f"run.warmstart_from={source}")
    summary = train_pipeline(second.model_dump(mode="json"))
    assert "warmstart" not in summary["stage_seconds"] and summary["stage_seconds"]["train"] > 0
    assert not (tmp_path / "runs" / "second" / "warmstart").exists()
    other_world = micro(tmp_path, "run.name=third", "world.num_people=50", "tracking.enabled=false",
                        "registry.enabled=false", f"run.warmstart_from={source}")
    with pytest.raises(ValueError, match="run.warmstart_from=.*no finished prepare output"):
        train_pipeline(other_world.model_dump(mode="json"))


def test_process_advantages_train_through_the_flow(tmp_path, prefect_server):
    from arborl.flows.pipeline import train_pipeline

    cfg = micro(tmp_path, "advantage.estimator=process", "run.iterations=1", "tracking.enabled=false",
                "registry.enabled=false")
    summary = train_pipeline(cfg.model_dump(mode="json"))
    train = json.loads((tmp_path / "runs" / "micro" / "iter_001" / "train" / "_manifest.json").read_text())
    assert train["metrics"]["packed"] == 1.0 and summary["stage_seconds"]["train"] > 0


def test_bad_override_is_rejected_before_anything_runs(tmp_path):
    from arborl.components.config import ConfigError

    with pytest.raises(ConfigError, match="sampling.tree_per_prompt"):
        micro(tmp_path, "sampling.tree_per_prompt=3")


def test_sharded_sampling_fans_out_and_merges_to_the_unsharded_trees(tmp_path, prefect_server):
    from arborl.components.stages import sample
    from arborl.flows.pipeline import train_pipeline

    cfg = micro(tmp_path, "sampling.shards=2", "run.iterations=1", "tracking.enabled=false")
    train_pipeline(cfg.model_dump(mode="json"))
    run_root = tmp_path / "runs" / "micro"
    out = run_root / "iter_001" / "sample"
    shard_dirs = sorted(p.name for p in (run_root / "iter_001" / "sample-shards").iterdir())
    assert shard_dirs == ["part-00000-of-00002", "part-00001-of-00002"]
    assert json.loads((out / "_manifest.json").read_text())["metrics"]["shards"] == 2

    one = micro(tmp_path, "run.iterations=1", "tracking.enabled=false")  # same seed, one shard
    whole = sample.run(one, {"model": str(run_root / "warmstart"), "world": str(run_root / "prepare")},
                       str(tmp_path / "unsharded"), iteration=1)

    def without_logprobs(uri):
        return [{k: v for k, v in r.items() if k != "logprobs"} for r in storage.read_parquet(uri).to_pylist()]

    assert without_logprobs(str(out / "nodes.parquet")) == without_logprobs(whole.outputs["nodes"])


def test_keep_iterations_prunes_old_models_and_a_resumed_run_does_not_retrain_them(tmp_path, prefect_server,
                                                                                  monkeypatch):
    from safetensors.torch import load_file

    from arborl.flows.pipeline import train_pipeline

    cfg = micro(tmp_path, "run.iterations=3", "run.eval_every=3", "run.keep_iterations=1",
                "train.save_dtype=bfloat16", "train.checkpoint_every=1", "tracking.enabled=false",
                "registry.enabled=false")
    run_root = tmp_path / "runs" / "micro"
    crash_in_train(monkeypatch, cfg, 3)

    def files(it: int) -> set[str]:
        return {p.name for p in (run_root / f"iter_{it:03d}" / "train").iterdir()}

    def train_manifest(it: int) -> dict:
        return json.loads((run_root / f"iter_{it:03d}" / "train" / "_manifest.json").read_text())

    assert files(1) == {"_manifest.json", "_stage.json"} and train_manifest(1)["pruned"]["weights"]
    assert {"model.safetensors", "optimizer.pt"} <= files(2)  # the newest complete iteration: all of it
    before = {it: train_manifest(it)["finished_at"] for it in (1, 2)}

    summary = train_pipeline(cfg.model_dump(mode="json"))  # resumes: iteration 3 trains from iteration 2's model
    assert [h["iteration"] for h in summary["history"]] == [1, 2, 3]
    assert {it: train_manifest(it)["finished_at"] for it in (1, 2)} == before  # not retrained
    assert files(1) == files(2) == {"_manifest.json", "_stage.json"}
    assert {"model.safetensors", "optimizer.pt"} <= files(3) and "pruned" not in train_manifest(3)
    saved = load_file(str(run_root / "iter_003" / "train" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}
    assert (run_root / "warmstart" / "model.safetensors").exists()  # the warm start is never pruned

    done = manifests(run_root)
    again = train_pipeline(cfg.model_dump(mode="json"))  # finished: everything is skipped
    assert manifests(run_root) == done and again["final"] == summary["final"]


def test_a_config_change_under_keep_iterations_resumes_to_a_fresh_runs_weights(tmp_path, prefect_server):
    """A finished run with `run.keep_iterations=1` (iteration 1's weights pruned), rerun after `train.lr` changed:
    every train stage is redone, nothing is wiped before its inputs are found, and the final weights equal a fresh
    run of the changed config: no stale stage is mixed in."""
    from safetensors.torch import load_file

    from arborl.flows.pipeline import train_pipeline

    keys = ("run.iterations=2", "run.eval_every=2", "run.keep_iterations=1", "tracking.enabled=false",
            "registry.enabled=false")
    train_pipeline(micro(tmp_path / "a", *keys).model_dump(mode="json"))
    run_root = tmp_path / "a" / "runs" / "micro"
    assert json.loads((run_root / "iter_001" / "train" / "_manifest.json").read_text())["pruned"]["weights"]
    before = manifests(run_root)
    resumed = train_pipeline(micro(tmp_path / "a", *keys, "train.lr=3e-5").model_dump(mode="json"))
    after = manifests(run_root)
    assert {k for k in before if after[k] != before[k]} >= {"iter_001/train", "iter_002/sample", "iter_002/train"}
    fresh = train_pipeline(micro(tmp_path / "b", *keys, "train.lr=3e-5").model_dump(mode="json"))
    got = load_file(str(run_root / "iter_002" / "train" / "model.safetensors"))
    want = load_file(str(tmp_path / "b" / "runs" / "micro" / "iter_002" / "train" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert resumed["final"] == fresh["final"]


def test_training_state_every_k_iterations_resumes_bit_identical_by_replay(tmp_path, prefect_server, monkeypatch):
    """`train.checkpoint_every=3` in one process: iterations 3 and 6 (the last) write their training state, the
    others keep it in memory, and no stage reads a model back from disk. A crash in iteration 6's train stage and
    a restart in a new process (nothing in memory) replays iterations 4 and 5 from iteration 3's state, reading
    one model from disk, and ends with the uninterrupted run's weights, bit for bit, though iteration 4's weights
    were pruned (run.keep_iterations=1)."""
    from safetensors.torch import load_file

    from arborl.components.training import warm
    from arborl.flows.pipeline import train_pipeline

    keys = ("run.iterations=6", "run.eval_every=6", "train.checkpoint_every=3", "train.save_dtype=bfloat16",
            "run.keep_iterations=1", "tracking.enabled=false", "registry.enabled=false")
    warm.clear()
    warm.LOADS.clear()
    straight = train_pipeline(micro(tmp_path / "straight", *keys).model_dump(mode="json"))
    assert warm.LOADS["disk"] == 0 and warm.LOADS["warm"] > 0
    straight_root = tmp_path / "straight" / "runs" / "micro"
    with_state = {it for it in range(1, 7) if (straight_root / f"iter_{it:03d}" / "train" / "optimizer.pt").exists()}
    assert with_state == {6}  # 3's went once 6 had its own (keep_iterations=1)

    cfg = micro(tmp_path / "crash", *keys)
    crash_in_train(monkeypatch, cfg, 6)
    run_root = tmp_path / "crash" / "runs" / "micro"
    assert (run_root / "iter_003" / "train" / "optimizer.pt").exists()  # what a restart replays from
    assert not (run_root / "iter_004" / "train" / "model.safetensors").exists()  # pruned
    warm.clear()  # a new process
    warm.LOADS.clear()
    resumed = train_pipeline(cfg.model_dump(mode="json"))
    assert warm.LOADS["disk"] == 1
    got = load_file(str(run_root / "iter_006" / "train" / "model.safetensors"))
    want = load_file(str(straight_root / "iter_006" / "train" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert resumed["final"] == straight["final"]


def test_a_changed_reward_reruns_everything_downstream_and_registers_the_new_weights(tmp_path, prefect_server):
    """A rerun of the same run.name after `verify.reward` changed: verify reruns, and so do label, train and evaluate
    downstream of it (their inputs' URIs are the same, their contents are not); prepare, the warm start and sample
    are skipped. The new weights get their own MLflow run (its params are the new config's) and their own
    registered version, tagged with their digest; no version is registered twice from the same weights."""
    from arborl.components.registry.store import weights_digest
    from arborl.components.tracking.tags import WEIGHTS_TAG
    from arborl.flows.pipeline import train_pipeline

    # its own model name: the rejected-challenger events of another test's arborl-micro v2 are not mixed up with it
    first_cfg = micro(tmp_path, "run.iterations=1", "run.eval_every=1", "registry.model_name=arborl-rerun")
    first = train_pipeline(first_cfg.model_dump(mode="json"))
    run_root = tmp_path / "runs" / "micro"
    before = manifests(run_root)
    weights_before = weights_digest(str(run_root / "iter_001" / "train"))
    changed = micro(tmp_path, "run.iterations=1", "run.eval_every=1", "registry.model_name=arborl-rerun",
                    "verify.reward.default=qa_f1")
    second = train_pipeline(changed.model_dump(mode="json"))
    after = manifests(run_root)
    redone = {k for k in before if after[k] != before[k]}
    # evaluations score with the reward too, so the warm start's is redone as well
    assert redone == {f"iter_001/{s}" for s in ("verify", "label", "train", "eval")} | {"warmstart_eval"}
    assert weights_digest(str(run_root / "iter_001" / "train")) != weights_before

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert second["mlflow_run_id"] != first["mlflow_run_id"]
    new_run = client.get_run(second["mlflow_run_id"])
    assert new_run.data.params["verify.reward.default"] == "qa_f1"
    assert new_run.data.tags["arborl.supersedes"] == first["mlflow_run_id"]
    versions = client.search_model_versions("name='arborl-rerun'")
    digests = [v.tags[WEIGHTS_TAG] for v in versions]
    assert len(versions) == 2 and len(set(digests)) == 2  # one version per weights
    newest = max(versions, key=lambda v: int(v.version))
    assert newest.tags[WEIGHTS_TAG] == weights_digest(str(run_root / "iter_001" / "train"))
    assert newest.run_id == second["mlflow_run_id"]


def test_a_policy_that_stops_searching_is_flagged_once(tmp_path):
    """Tool calls per sampled trajectory below half the warm start's: one warning line and the MLflow tag
    `arborl.search_collapse` (a real SQLite-backed MLflow run); above it, nothing."""
    import logging

    from arborl.components.tracking.mlflow_run import Tracker
    from arborl.flows.dashboards import Dashboards
    from arborl.flows.pipeline import SEARCH_COLLAPSE_TAG, RunContext
    from arborl.flows.progress import get_reporter

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    logger, lines = logging.getLogger("arborl.flows"), Lines()
    saved = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)  # whatever an earlier command set
    try:
        cfg = micro(tmp_path)
        tracker = Tracker(cfg, str(tmp_path / "runs" / "micro"))
        ctx = RunContext(cfg, str(tmp_path / "runs" / "micro"), tracker, Dashboards(tracker, cfg), get_reporter(),
                         warm_tool_calls=2.0)
        ctx.watch_search(1, {"tool_calls_per_trajectory": 1.2})
        assert ctx.search_collapse is None
        ctx.watch_search(2, {"tool_calls_per_trajectory": 0.9})
        ctx.watch_search(3, {"tool_calls_per_trajectory": 0.1})
        assert ctx.search_collapse == 2
        assert [line for line in lines.lines if "stop searching" in line] == [
            "iteration 2: 0.90 tool calls per sampled trajectory, under half the warm start's 2.00: "
            "the policy is learning to stop searching"]
        tags = MlflowClient(tracking_uri=tracker.uri).get_run(tracker.run_id).data.tags
        assert tags[SEARCH_COLLAPSE_TAG] == "iteration 2: 0.90 tool calls per trajectory, warm start 2.00"
        tracker.finish()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(saved)
