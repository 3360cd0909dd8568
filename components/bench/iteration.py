"""`arborl bench iteration`: where an RL iteration's seconds and bytes go, before and after keeping the policy
warm in memory with the training state written every k iterations, side by side in one process.

On a config (the default model): one base run makes the world and warm start, then two in-process runs of the
same iterations start from it. "before" reads every model back from disk and writes the training state every
iteration (`train.checkpoint_every=1`, warm cache off); "after" keeps the policy warm and writes the state every
`checkpoint_every` iterations. Per run: seconds per iteration (the flow's wall time less its evaluations), each
stage's seconds, the time outside the stages (orchestration, tracking), model loads from disk and from memory,
and bytes written per iteration. The seconds are split further (`breakdown.py`): inside the stages, the train
stage's compute, model saves, Parquet writes and manifests; outside them, Prefect's task runs, MLflow requests,
Prefect UI updates and the rest.

`model_io` measures what an iteration moves at a real model size, with no sampling: a model of a named
architecture with random weights, one Adam step on a short random batch so that its state exists, then the
seconds and bytes of saving the weights in bfloat16, writing and reading the training state, and loading the
model back. Per-iteration bytes follow: weights every iteration, the state every k-th.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from arborl.components.artifacts import manifests, storage
from arborl.components.bench import breakdown
from arborl.components.config import Config
from arborl.components.evaluation.compare import base_config
from arborl.components.stages.contract import StageResult
from arborl.components.training import training_state, warm

ITERATION_STAGES = ("sample", "verify", "label", "train")

# Hugging Face configs of architectures the model I/O bench builds with random weights (no download).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": True},
}
PARAMS_3B = 3.09e9  # Qwen2.5-3B's parameter count, for the extrapolation


@contextlib.contextmanager
def _cold() -> Any:
    """Every model read back from disk, as before the warm cache: nothing is kept."""
    saved = warm.remember
    warm.remember = lambda *args, **kwargs: None
    warm.clear()
    try:
        yield
    finally:
        warm.remember = saved


def _finished(path: Path) -> StageResult:
    return StageResult.from_manifest(str(path), manifests.read_manifest(str(path)))


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _one_run(cfg: Config, name: str, base_root: str, iterations: int, checkpoint_every: int, cold: bool
             ) -> dict[str, float]:
    from arborl.flows.pipeline import iteration_dir, train_pipeline

    data = cfg.model_dump(mode="json")
    data["run"].update({"name": name, "iterations": iterations, "eval_every": iterations, "warmstart_from": base_root,
                        "keep_iterations": None})
    data["registry"]["enabled"] = False
    data["train"]["checkpoint_every"] = checkpoint_every
    data["orchestration"]["executor"] = "inprocess"
    run_cfg = Config.model_validate(data)
    root = storage.child(run_cfg.run.output_root, name)
    loads_before = dict(warm.LOADS)
    with _cold() if cold else contextlib.nullcontext(), breakdown.timed() as timers:
        started = time.perf_counter()
        train_pipeline(run_cfg.model_dump(mode="json"))
        wall = time.perf_counter() - started
    local = Path(storage.filesystem(root)[1])
    stage_seconds = {s: 0.0 for s in ITERATION_STAGES}
    eval_seconds, written, train_written = 0.0, 0, 0
    for it in range(1, iterations + 1):
        it_dir = Path(storage.filesystem(iteration_dir(root, it))[1])
        for stage in ITERATION_STAGES:
            stage_seconds[stage] += _finished(it_dir / stage).seconds
            written += _bytes(it_dir / stage)
        train_written += _bytes(it_dir / "train")
        if (it_dir / "eval").exists():
            eval_seconds += _finished(it_dir / "eval").seconds
    if (local / "warmstart_eval").exists():
        eval_seconds += _finished(local / "warmstart_eval").seconds
    per_iteration = (wall - eval_seconds) / iterations
    in_stages = sum(stage_seconds.values()) / iterations
    out: dict[str, float] = {"seconds_per_iteration": per_iteration, "outside_stages_per_iteration":
                             per_iteration - in_stages, "bytes_written_per_iteration": written / iterations,
                             "train_bytes_per_iteration": train_written / iterations,
                             "model_loads_disk": warm.LOADS["disk"] - loads_before.get("disk", 0),
                             "model_loads_memory": warm.LOADS["warm"] - loads_before.get("warm", 0)}
    out.update({f"{stage}_seconds_per_iteration": s / iterations for stage, s in stage_seconds.items()})
    out.update(_split(timers, stage_seconds, iterations, out["outside_stages_per_iteration"]))
    return out


def _split(timers: breakdown.Timers, stage_seconds: dict[str, float], iterations: int, outside: float
           ) -> dict[str, float]:
    """Per iteration: inside the stages, the train stage's compute apart from its writes, model saves, Parquet
    writes and manifests (with the file digests); outside them, Prefect's task runs (a stage call's seconds
    less the stage's own), MLflow requests, Prefect UI updates, and the rest (flow code, logging, pruning)."""
    train = timers.by_stage["train"]
    task_runs = sum(timers.stage_calls[s] - stage_seconds[s] for s in ITERATION_STAGES)
    parts = {"train_compute": stage_seconds["train"] - sum(train.values()),
             **{c: timers.seconds[c] for c in breakdown.INSIDE_STAGES},
             "prefect_task_runs": task_runs, "tracking": timers.seconds["tracking"],
             "dashboards": timers.seconds["dashboards"]}
    parts = {f"{k}_per_iteration": v / iterations for k, v in parts.items()}
    parts["other_outside_per_iteration"] = outside - sum(parts[f"{k}_per_iteration"] for k in (
        "prefect_task_runs", "tracking", "dashboards"))
    return parts


def bench_iteration(cfg: Config, workdir: str, iterations: int = 20, checkpoint_every: int = 10) -> dict[str, Any]:
    """Before (cold, state every iteration) and after (warm, state every `checkpoint_every`) on `cfg`, from one
    warm start made under `workdir`; returns both runs' numbers and the speedup."""
    from arborl.flows.pipeline import train_pipeline

    data = cfg.model_dump(mode="json")
    data["run"]["output_root"] = workdir
    data["orchestration"]["executor"] = "inprocess"
    cfg = Config.model_validate(data)
    base = base_config(cfg, cfg.run.seed)
    train_pipeline(base.model_dump(mode="json"))
    base_root = storage.child(base.run.output_root, base.run.name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    before = _one_run(cfg, f"bench-before-{stamp}", base_root, iterations, 1, cold=True)
    after = _one_run(cfg, f"bench-after-{stamp}", base_root, iterations, checkpoint_every, cold=False)
    result: dict[str, Any] = {"iterations": iterations, "checkpoint_every": checkpoint_every}
    result.update({f"before_{k}": v for k, v in before.items()})
    result.update({f"after_{k}": v for k, v in after.items()})
    result["speedup"] = before["seconds_per_iteration"] / after["seconds_per_iteration"]
    return result


def model_io(model_config: str, workdir: str, checkpoint_every: int = 10) -> dict[str, Any]:
    """Seconds and bytes of one iteration's model I/O for the architecture `model_config` (MODEL_CONFIGS) with
    random weights, on the CPU, under `workdir`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from arborl.components.training.models import build_tokenizer, load_policy, save_policy

    if model_config not in MODEL_CONFIGS:
        raise ValueError(f"--model-config {model_config!r}: choose one of {', '.join(MODEL_CONFIGS)}")
    spec = dict(MODEL_CONFIGS[model_config])
    hf_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    ids = torch.randint(0, hf_config.vocab_size, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()  # one step, so the Adam moments exist
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokenizer = build_tokenizer(["a", "b"])
    out = str(Path(workdir) / f"model-io-{model_config}")
    storage.remove(out)

    started = time.perf_counter()
    save_policy(model, tokenizer, out, dtype="bfloat16")
    save_s = time.perf_counter() - started
    weights_bytes = _bytes(Path(out))

    master = training_state.master_weights(dict(model.named_parameters(remove_duplicate=False)), "bfloat16")
    started = time.perf_counter()
    training_state.write_training_state(out, optimizer.state_dict(), master)
    state_save_s = time.perf_counter() - started
    state_bytes = _bytes(Path(out)) - weights_bytes
    del optimizer, master

    started = time.perf_counter()
    load_policy(out, "cpu", dtype="bfloat16")
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    training_state.read_training_state(out)
    state_load_s = time.perf_counter() - started
    storage.remove(out)

    k = checkpoint_every
    per_iteration_before = weights_bytes + state_bytes
    per_iteration_after = weights_bytes + state_bytes / k
    bf16_weights = 2 * params
    return {
        "model_config": model_config, "parameters": params, "checkpoint_every": k,
        "weights_bytes": weights_bytes, "training_state_bytes": state_bytes,
        "save_weights_seconds": save_s, "save_state_seconds": state_save_s,
        "load_weights_seconds": load_s, "load_state_seconds": state_load_s,
        "bytes_per_iteration_before": per_iteration_before,
        "bytes_per_iteration_after": per_iteration_after,
        "bytes_between_checkpoints_over_bf16_weights": weights_bytes / bf16_weights,
        "bytes_per_iteration_after_over_bf16_weights": per_iteration_after / bf16_weights,
        "read_back_bytes_per_iteration_before": per_iteration_before,  # the next stages read it all back
        "read_back_bytes_per_iteration_after": 0,  # in memory; only a restart reads
        "extrapolated_3b_bytes_per_iteration_before": per_iteration_before * PARAMS_3B / params,
        "extrapolated_3b_bytes_per_iteration_after": per_iteration_after * PARAMS_3B / params,
    }
