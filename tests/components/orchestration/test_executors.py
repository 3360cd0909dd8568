"""Executors on real child processes: a stage run as `arborl stage` from a resolved config.json (local and on
a moto S3 server on 127.0.0.1), its result read back from the manifest, and failures that name the stage and exit
code. The Docker and Kubernetes executors need an engine or a cluster, which do not exist here (their specs are
tested in test_specs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from arborl.components.artifacts import manifests, storage
from arborl.components.config import load_config
from arborl.components.orchestration import KubernetesExecutor, StageFailed, SubprocessExecutor, make_executor
from arborl.components.stages import STAGES
from arborl.components.stages.contract import StageResult

ROOT = Path(__file__).resolve().parents[3]


def micro(output_root: str, *overrides: str):
    return load_config(ROOT / "configs" / "micro.yaml",
                       [f"run.output_root={output_root}", "orchestration.executor=subprocess", *overrides])


def resolved_config(cfg) -> str:
    """The run's resolved config where the flow writes it (`<output_root>/<run.name>/config.json`)."""
    uri = storage.child(storage.child(cfg.run.output_root, cfg.run.name), "config.json")
    storage.write_json(uri, cfg.model_dump(mode="json"))
    return uri


@pytest.mark.slow  # starts processes
def test_a_stage_in_a_child_process_returns_the_in_process_result_and_a_rerun_is_skipped(tmp_path):
    cfg = micro(str(tmp_path / "runs"))
    config_uri = resolved_config(cfg)
    out = str(tmp_path / "runs" / "micro" / "prepare")
    result = SubprocessExecutor(cfg).run("prepare", config_uri, {}, out, {})
    local = STAGES["prepare"](cfg, {}, str(tmp_path / "inprocess"))

    assert isinstance(result, StageResult)
    assert (result.stage, result.out, result.skipped) == ("prepare", out, False)
    assert result.metrics == local.metrics and result.metrics["train_prompts"] == 60
    assert set(result.outputs) == set(local.outputs)
    for key, uri in result.outputs.items():
        assert Path(uri).read_bytes() == Path(local.outputs[key]).read_bytes(), key

    manifest = Path(out) / "_manifest.json"
    written = manifest.stat().st_mtime_ns
    again = SubprocessExecutor(cfg).run("prepare", config_uri, {}, out, {})
    assert again.skipped is True and again.metrics == result.metrics
    assert manifest.stat().st_mtime_ns == written


@pytest.mark.slow  # starts processes
def test_a_stage_process_reads_its_config_from_s3_and_writes_there(s3_bucket):
    """The child inherits the S3 endpoint and credentials from the environment, as a stage container would."""
    root, client = s3_bucket
    cfg = micro(f"{root}/runs", "orchestration.env={ARBORL_STAGE_MARK: s3}")
    config_uri = resolved_config(cfg)
    assert config_uri == f"{root}/runs/micro/config.json"
    out = f"{root}/runs/micro/prepare"
    result = SubprocessExecutor(cfg).run("prepare", config_uri, {}, out, {})
    assert result.skipped is False and result.metrics["test_prompts"] == 12
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="arborl-test", Prefix="runs/micro/prepare/")["Contents"]}
    assert "runs/micro/prepare/_manifest.json" in keys
    assert manifests.read_manifest(out)["metrics"] == result.metrics


@pytest.mark.slow  # starts processes
def test_a_failing_stage_names_the_stage_exit_code_and_its_last_output(tmp_path):
    cfg = micro(str(tmp_path / "runs"))
    config_uri = resolved_config(cfg)
    missing = str(tmp_path / "runs" / "micro" / "iter_001" / "sample")
    with pytest.raises(StageFailed) as failed:
        SubprocessExecutor(cfg).run("verify", config_uri, {"nodes": missing, "world": missing},
                                    str(tmp_path / "runs" / "micro" / "iter_001" / "verify"), {})
    message = str(failed.value)
    assert failed.value.stage == "verify" and failed.value.exit_code == 2  # the user's input: a missing input
    assert message.startswith("stage verify failed (subprocess, exit code 2)")
    assert "input 'nodes'" in message and "missing or incomplete" in message


def test_a_crashing_stage_command_reports_its_stderr(tmp_path):
    crash = "import sys; print('loading', flush=True); print('CUDA out of memory', file=sys.stderr); sys.exit(7)"
    cfg = micro(str(tmp_path / "runs"), f"orchestration.command=[{sys.executable}, -c, \"{crash}\"]")
    with pytest.raises(StageFailed, match=r"stage train failed \(subprocess, exit code 7\)") as failed:
        SubprocessExecutor(cfg).run("train", resolved_config(cfg), {}, str(tmp_path / "out"), {"iteration": 2})
    # stdout and stderr are read side by side: both lines are kept, in either order
    assert sorted(failed.value.tail) == ["CUDA out of memory", "loading"]


def test_a_stage_that_exits_cleanly_without_a_manifest_fails(tmp_path):
    cfg = micro(str(tmp_path / "runs"), f"orchestration.command=[{sys.executable}, -c, pass]")
    with pytest.raises(StageFailed, match="without a manifest of stage label"):
        SubprocessExecutor(cfg).run("label", resolved_config(cfg), {}, str(tmp_path / "out"), {})


def test_a_missing_program_is_named(tmp_path):
    cfg = micro(str(tmp_path / "runs"), f"orchestration.command=[{tmp_path / 'no-such-arborl'}]")
    with pytest.raises(StageFailed, match="stage prepare failed .*cannot start .*no-such-arborl"):
        SubprocessExecutor(cfg).run("prepare", resolved_config(cfg), {}, str(tmp_path / "out"), {})


def test_executor_choice_and_a_kubernetes_run_on_a_local_root_is_refused(tmp_path):
    assert isinstance(make_executor(micro(str(tmp_path))), SubprocessExecutor)
    with pytest.raises(ValueError, match="runs stages in the calling process"):
        make_executor(micro(str(tmp_path), "orchestration.executor=inprocess"))
    with pytest.raises(ValueError, match="run.output_root .* is local to this machine"):
        KubernetesExecutor(micro(str(tmp_path), "orchestration.executor=kubernetes"))
    mounted = micro(str(tmp_path), "orchestration.executor=kubernetes",
                    f"orchestration.volumes=[{{mount_path: {tmp_path}, claim: runs}}]")
    assert isinstance(make_executor(mounted), KubernetesExecutor)
