"""components.stages.train as a process: kill -9 and resume, two gloo ranks under torchrun, LoRA.

Inputs come from the real micro-config stages (prepare, warm start, sample); leaf rewards are seeded random
numbers so that every tree carries non-zero advantages. Every subprocess has a hard timeout.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arborl.components.artifacts import manifests, schemas, storage
from arborl.components.config import load_config
from arborl.components.sampling.forest import read_prompt_tokens
from arborl.components.stages import label, prepare, sample, train, warmstart
from arborl.components.stages.train import CHECKPOINT_DIR
from arborl.components.training import training_state

ROOT = Path(__file__).resolve().parents[3]
MICRO = ROOT / "configs" / "micro.yaml"
# 2 epochs × 6 mini-batches = 12 optimizer steps of micro-batches of 2 trajectories
TRAIN = ["run.threads=1", "train.ppo_epochs=2", "train.mini_batches=6", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train-stage")
    cfg = load_config(MICRO, ["run.threads=1", "warmstart.steps=2"])
    world = prepare.run(cfg, {}, str(root / "prepare")).out
    model = warmstart.run(cfg, {"world": world}, str(root / "warmstart")).out
    nodes = sample.run(cfg, {"model": model, "world": world}, str(root / "sample"), iteration=1).out
    rows = schemas.read(storage.join(nodes, "nodes.parquet"), schemas.NODES).to_pylist()
    rng = random.Random(0)
    rewards = [{"prompt_id": r["prompt_id"], "tree_id": r["tree_id"], "leaf_id": r["node_id"],
                "reward": rng.random(), "correct": False, "f1": 0.0, "verifier": "seeded", "details": "{}",
                "error": None} for r in rows if r["is_leaf"]]
    verify_out = str(root / "verify")
    schemas.write(rewards, schemas.REWARDS, storage.join(verify_out, "rewards.parquet"))
    manifests.write_manifest(verify_out, stage="verify", inputs={}, config_hash="seeded", outputs={}, metrics={},
                           started=time.time())
    advantages = label.run(cfg, {"nodes": nodes, "rewards": verify_out, "world": world}, str(root / "label")).out
    return {"model": model, "nodes": nodes, "advantages": advantages, "world": world}


def test_train_reads_the_prompt_tokens_sampling_saved_and_an_older_output_still_trains(inputs, tmp_path):
    from arborl.components.training.models import load_policy

    _, tokenizer = load_policy(inputs["model"])
    saved = read_prompt_tokens(inputs["nodes"])
    units = train.load_tree_units(inputs["nodes"], inputs["advantages"], inputs["world"], tokenizer)
    assert units and all(u.input_ids[: len(saved[u.key[0]])].tolist() == saved[u.key[0]] for u in units)
    # what train uses is the file: other ids there give other units
    changed = tmp_path / "changed"
    shutil.copytree(inputs["nodes"], changed)
    schemas.write([{"prompt_id": pid, "token_ids": [*ids, ids[-1]]} for pid, ids in saved.items()],
                  schemas.PROMPT_TOKENS, str(changed / schemas.PROMPT_TOKENS_FILE))
    longer = train.load_tree_units(str(changed), inputs["advantages"], inputs["world"], tokenizer)
    assert [u.num_tokens for u in longer] == [u.num_tokens + 1 for u in units]
    # a sample output from before the file existed: the prompts are tokenized again, to the same ids
    old = tmp_path / "old"
    shutil.copytree(inputs["nodes"], old)
    (old / schemas.PROMPT_TOKENS_FILE).unlink()
    again = train.load_tree_units(str(old), inputs["advantages"], inputs["world"], tokenizer)
    assert [u.input_ids.tolist() for u in again] == [u.input_ids.tolist() for u in units]


def _command(inputs: dict[str, str], out: Path, *overrides: str) -> list[str]:
    args = ["stage", "train", "--config", str(MICRO), "--out", str(out), "--iteration", "1"]
    for key, uri in inputs.items():
        args += ["--in", f"{key}={uri}"]
    return [*args, *TRAIN, *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(inputs, out: Path, *overrides: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "arborl.flows.cli"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m",
        "arborl.flows.cli"]
    done = subprocess.run([*launcher, *_command(inputs, out, *overrides)], env=_env(), capture_output=True,
                          text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.mark.slow  # starts processes
def test_killed_train_stage_resumes_to_the_same_weights(inputs, tmp_path):
    _run(inputs, tmp_path / "straight")
    reference = _weights(tmp_path / "straight")

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "arborl.flows.cli", *_command(inputs, out, "train.save_every_steps=2")]
    proc = subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while not list((out / CHECKPOINT_DIR).glob("step-*/checkpoint.json")):
            assert proc.poll() is None, "the stage ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / manifests.MANIFEST).exists()  # killed mid-way: no finished output
    assert list((out / CHECKPOINT_DIR).glob("step-*"))

    rerun = _run(inputs, out, "train.save_every_steps=2")
    assert "resuming from" in rerun.stderr
    assert (out / manifests.MANIFEST).exists() and not (out / CHECKPOINT_DIR).exists()
    _assert_same(_weights(out), reference, atol=0.0)  # bit for bit
    assert any(not torch.equal(v, load_file(str(Path(inputs["model"]) / "model.safetensors"))[k])
               for k, v in reference.items())


@pytest.mark.slow  # starts processes
def test_two_ranks_take_the_same_step_as_one(inputs, tmp_path):
    # 8 trees in mini-batches of 3, 3, 2, one tree per micro-batch: the ranks own 2 and 1 trees of a
    # mini-batch, so one of them pads with a zero backward pass
    step = ["train.ppo_epochs=1", "train.mini_batches=3", "train.max_tokens_per_microbatch=1"]
    _run(inputs, tmp_path / "one", *step)
    two = _run(inputs, tmp_path / "two", *step, ranks=2)
    assert '"world_size": 2' in two.stdout
    _assert_same(_weights(tmp_path / "two"), _weights(tmp_path / "one"), atol=1e-6)
    one_metrics = manifests.read_manifest(str(tmp_path / "one"))["metrics"]
    two_metrics = manifests.read_manifest(str(tmp_path / "two"))["metrics"]
    assert two_metrics["loss"] == pytest.approx(one_metrics["loss"], rel=1e-5, abs=1e-7)
    assert two_metrics["grad_norm"] == pytest.approx(one_metrics["grad_norm"], rel=1e-5)


def test_lora_stage_saves_a_merged_model_and_continues_its_adapter(inputs, tmp_path):
    lora = ["train.lora.enabled=true", "train.lora.rank=4", "train.lr=0.01"]
    cfg = load_config(MICRO, TRAIN + lora)
    first = train.run(cfg, inputs, str(tmp_path / "it1"), iteration=1)
    weights = _weights(tmp_path / "it1")
    assert not any("lora" in k for k in weights)
    base = load_file(str(Path(inputs["model"]) / "model.safetensors"))
    changed = {k for k in weights if not torch.equal(weights[k], base[k])}
    assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                           for k in changed)
    assert first.metrics["grad_norm"] > 0
    second = train.run(cfg, {**inputs, "model": str(tmp_path / "it1")}, str(tmp_path / "it2"), iteration=2)
    assert storage.read_json(str(tmp_path / "it2" / "lora_base.json")) == {"base": inputs["model"]}
    assert second.metrics["grad_norm"] > 0


def _master(out: Path) -> dict[str, torch.Tensor]:
    state = training_state.read_training_state(str(out))
    assert state is not None and state.master is not None
    return state.master


def test_bfloat16_saves_continue_from_the_float32_master_weights(inputs, tmp_path):
    cfg32 = load_config(MICRO, TRAIN)
    cfg16 = load_config(MICRO, [*TRAIN, "train.save_dtype=bfloat16"])
    for cfg, tag in ((cfg32, "f32"), (cfg16, "bf16")):
        train.run(cfg, inputs, str(tmp_path / f"it1-{tag}"), iteration=1)
        train.run(cfg, {**inputs, "model": str(tmp_path / f"it1-{tag}")}, str(tmp_path / f"it2-{tag}"), iteration=2)
    for it in ("it1", "it2"):
        full, saved = _weights(tmp_path / f"{it}-f32"), _weights(tmp_path / f"{it}-bf16")
        assert {v.dtype for v in full.values()} == {torch.float32} and {v.dtype for v in saved.values()} == {
            torch.bfloat16}
        assert (tmp_path / f"{it}-bf16" / "model.safetensors").stat().st_size < 0.6 * (
            tmp_path / f"{it}-f32" / "model.safetensors").stat().st_size
        master = _master(tmp_path / f"{it}-bf16")
        for k, v in full.items():  # the float32 weights of a float32 run, bit for bit, after two iterations
            assert torch.equal(master[k], v), k
            assert torch.equal(saved[k], v.to(torch.bfloat16)), k
        assert training_state.read_training_state(str(tmp_path / f"{it}-f32")).master is None  # exact: none kept

    # the master copy is what the next iteration starts from: without it, from the rounded weights, it differs
    rounded = tmp_path / "it1-rounded"
    shutil.copytree(tmp_path / "it1-bf16", rounded)
    state = training_state.read_training_state(str(rounded))
    training_state.write_training_state(str(rounded), state.optimizer, None)
    train.run(cfg16, {**inputs, "model": str(rounded)}, str(tmp_path / "it2-rounded"), iteration=2)
    assert any(not torch.equal(_master(tmp_path / "it2-rounded")[k], v)
               for k, v in _weights(tmp_path / "it2-f32").items())
