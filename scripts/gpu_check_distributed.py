"""GPU check of the distributed training options (needs torch, transformers, pydantic, peft and this repo).

Run under torchrun on one GPU:  torchrun --standalone --nproc_per_node 1 scripts/gpu_check_distributed.py

One packed policy step on CUDA of the same model and trees, compared by gradients: plain fp32 vs DDP (NCCL)
vs FSDP (full-state gather of the updated weights), bf16 autocast and gradient checkpointing (with their
peak memory on a larger Llama), and LoRA under DDP + bf16 + checkpointing. Prints one JSON object (and
writes it to $OUT/gpu_distributed.json when OUT is set).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout_imports import use_checkout  # noqa: E402

use_checkout()

from gpu_check_training import tree_grpo_trees  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from arborl.components.config import LoraSettings, TrainConfig  # noqa: E402
from arborl.components.training import distributed, trainer  # noqa: E402
from arborl.components.training.distributed import Dist  # noqa: E402
from arborl.components.training.packing import build_units  # noqa: E402


def step(model, units, cfg, d: Dist, pad=0):
    """One policy step with SGD(lr=0) (weights unchanged) → (metrics, grads by name, peak MiB, seconds)."""
    wrapped = distributed.wrap(model, d)
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    metrics = trainer.policy_update(wrapped, opt, units, cfg, pad, seed=0, dist=d)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**20
    if d.mode == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
            grads = {k.replace("_fsdp_wrapped_module.", ""): p.grad.float().clone()
                     for k, p in wrapped.named_parameters() if p.grad is not None}
        state = distributed.full_state_dict(wrapped)
        return metrics, grads, peak, seconds, state
    grads = {k: p.grad.float().clone() for k, p in distributed.unwrap(wrapped).named_parameters()
             if p.grad is not None}
    return metrics, grads, peak, seconds, None


def rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in b)


def cosine(a, b):
    x = torch.cat([a[k].flatten() for k in sorted(b)])
    y = torch.cat([b[k].flatten() for k in sorted(b)])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def main() -> None:
    assert torch.cuda.is_available(), "needs CUDA"
    base = distributed.init("ddp", "cuda")  # starts the NCCL process group
    ddp, fsdp = Dist(base.rank, base.world_size, base.local_rank, "ddp"), Dist(base.rank, base.world_size,
                                                                                base.local_rank, "fsdp")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "world_size": base.world_size}
    cfg = TrainConfig(grad_clip=1e9, max_tokens_per_microbatch=4096)
    small = LlamaConfig(vocab_size=200, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=4, intermediate_size=512, max_position_embeddings=512, pad_token_id=0)
    small._attn_implementation = "sdpa"
    prompts, rows, adv = tree_grpo_trees(8, 200, seed=0)
    units = build_units(prompts, rows, adv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(small).cuda()

    m0, g0, _, _, _ = step(copy.deepcopy(model), units, cfg, Dist())
    m1, g1, _, _, _ = step(copy.deepcopy(model), units, cfg, ddp)
    result["ddp_vs_plain_max_rel_grad_diff"] = rel(g1, g0)
    result["ddp_vs_plain_loss_diff"] = abs(m1["loss"] - m0["loss"])
    try:
        m2, g2, _, _, state = step(copy.deepcopy(model), units, cfg, fsdp)
        result["fsdp_vs_plain_max_rel_grad_diff"] = rel(g2, g0)
        result["fsdp_vs_plain_loss_diff"] = abs(m2["loss"] - m0["loss"])
        ref = model.state_dict()
        result["fsdp_full_state_keys_match"] = set(state) == set(ref)
        result["fsdp_full_state_max_diff"] = max(float((state[k].cuda() - ref[k]).abs().max()) for k in ref)
    except Exception as exc:
        result["fsdp_error"] = f"{type(exc).__name__}: {exc}"[:600]
    bf = cfg.model_copy(update={"bf16": True})
    m3, g3, _, _, _ = step(copy.deepcopy(model), units, bf, ddp)
    result["bf16_vs_fp32_grad_cosine"] = cosine(g3, g0)
    result["bf16_vs_fp32_loss_diff"] = abs(m3["loss"] - m0["loss"])
    ck = copy.deepcopy(model)
    distributed.enable_gradient_checkpointing(ck)
    _, g4, _, _, _ = step(ck, units, cfg, ddp)
    result["checkpointing_vs_plain_max_rel_grad_diff"] = rel(g4, g0)

    from arborl.components.training.lora import wrap as lora_wrap

    lm = lora_wrap(copy.deepcopy(model), LoraSettings(enabled=True, rank=8, target_modules=["q_proj", "v_proj"]))
    distributed.enable_gradient_checkpointing(lm)
    m5, g5, _, _, _ = step(lm, units, bf, ddp)
    result["lora_ddp_bf16_ckpt_loss"] = m5["loss"]
    result["lora_grads_only_on_adapters"] = bool(g5) and all("lora_" in k for k in g5)

    # peak memory of one step on a larger Llama: fp32, bf16 autocast, bf16 + gradient checkpointing
    big = LlamaConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=16, intermediate_size=4096, max_position_embeddings=2048, pad_token_id=0)
    big._attn_implementation = "sdpa"
    prompts, rows, adv = tree_grpo_trees(16, 32000, seed=1)
    big_units = build_units(prompts, rows, adv)
    bcfg = TrainConfig(grad_clip=1e9, max_tokens_per_microbatch=16384)
    torch.manual_seed(0)
    bmodel = LlamaForCausalLM(big).cuda()
    for name, c, ckpt in (("fp32", bcfg, False), ("bf16", bcfg.model_copy(update={"bf16": True}), False),
                          ("bf16_ckpt", bcfg.model_copy(update={"bf16": True}), True)):
        m = copy.deepcopy(bmodel)
        if ckpt:
            distributed.enable_gradient_checkpointing(m)
        step(m, big_units, c, ddp)  # warm-up
        _, _, peak, seconds, _ = step(m, big_units, c, ddp)
        result[f"big_{name}_peak_mib"] = round(peak)
        result[f"big_{name}_step_s"] = round(seconds, 4)
        del m
        torch.cuda.empty_cache()
    text = json.dumps(result, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_distributed.json").write_text(text)
    distributed.shutdown(base)


if __name__ == "__main__":
    main()
