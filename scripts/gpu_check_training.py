"""GPU check of the packed trainer (needs only torch, transformers, pydantic and this repository).

On CUDA: packed vs duplicated loss and gradients in float32 and bfloat16 (sdpa), forward+backward time
of both forms on a larger Llama, and whether FlexAttention with a tree block mask gives the same
log-probs. Prints one JSON object (and writes it to $OUT/gpu_training.json when OUT is set).

    python scripts/gpu_check_training.py
"""

from __future__ import annotations

import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout_imports import use_checkout  # noqa: E402

use_checkout()

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from arborl.components.config import TrainConfig  # noqa: E402
from arborl.components.training import trainer  # noqa: E402
from arborl.components.training.packing import build_units, leaf_scales  # noqa: E402


def tree_grpo_trees(n_prompts: int, vocab: int, seed: int, turns: int = 4, act: int = 24, obs: int = 48):
    """Trees shaped like Tree-GRPO's M=2, N=2, L=1: one chain of `turns` steps, then 2 expansions from
    random nodes (root or non-leaf) that run to the end. Each step: `act` model tokens + `obs` observation."""
    rng = random.Random(seed)
    prompts, rows, adv = {}, [], {}
    for p in range(n_prompts):
        pid = f"q{p}"
        prompts[pid] = [1] + [rng.randrange(4, vocab) for _ in range(40)]
        for tid in range(2):
            nodes = []  # (node_id, parent, depth)

            def grow(parent, depth, nodes=nodes, pid=pid, tid=tid):
                for d in range(depth + 1, turns + 1):
                    nid = len(nodes)
                    nodes.append((nid, parent, d))
                    last = d == turns
                    ids = [rng.randrange(4, vocab) for _ in range(act + (0 if last else obs))]
                    mask = [True] * act + [False] * (0 if last else obs)
                    rows.append({"prompt_id": pid, "tree_id": tid, "node_id": nid, "parent_id": parent,
                                 "token_ids": ids, "loss_mask": mask,
                                 "logprobs": [-1.0 if m else float("nan") for m in mask]})
                    parent = nid

            grow(None, 0)
            for _ in range(2):
                candidates = [(None, 0)] + [(n, d) for n, _, d in nodes if d < turns]
                parent, depth = rng.choice(candidates)
                grow(parent, depth)
            leaves = {n for n, _, d in nodes if d == turns}
            for leaf in leaves:
                adv[(pid, tid, leaf)] = rng.uniform(-1.5, 1.5)
    return prompts, rows, adv


def loss_and_grads(model, units, form, cfg, pad):
    model = copy.deepcopy(model)
    scales, divisor = leaf_scales(units, cfg.loss_aggregation, cfg.seq_sum_horizon)
    rows = trainer.make_rows(units, form, scales)
    trainer.fill_logprobs(model, rows, cfg, pad, "old_logprobs")
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
    model.zero_grad(set_to_none=True)
    stats = trainer.compute_loss(model, rows, divisor, cfg, pad)
    return stats, {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None}


def rel_diff(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in b)


def timed(model, units, form, cfg, pad, repeats=5):
    scales, divisor = leaf_scales(units, cfg.loss_aggregation, cfg.seq_sum_horizon)
    rows = trainer.make_rows(units, form, scales)
    trainer.fill_logprobs(model, rows, cfg, pad, "old_logprobs")
    out = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.compute_loss(model, rows, divisor, cfg, pad)
        torch.cuda.synchronize()
        if i:
            out.append(time.perf_counter() - t)
    torch.cuda.reset_peak_memory_stats()
    model.zero_grad(set_to_none=True)
    trainer.compute_loss(model, rows, divisor, cfg, pad)
    return statistics.median(out), torch.cuda.max_memory_allocated() / 2**20


def flex_check(model_cfg, units, pad):
    """Packed log-probs with FlexAttention and a tree BlockMask vs sdpa with the dense 4D mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    torch.manual_seed(0)
    sdpa = LlamaForCausalLM(model_cfg).cuda().eval()
    cfg_flex = copy.deepcopy(model_cfg)
    cfg_flex._attn_implementation = "flex_attention"
    flex = LlamaForCausalLM(cfg_flex).cuda().eval()
    flex.load_state_dict(sdpa.state_dict())
    u = units[0]
    n = u.num_tokens
    seg, anc = u.segment.cuda(), u.ancestors.cuda()

    def tree_mask(b, h, q, kv):
        return (kv <= q) & anc[seg[q], seg[kv]]

    block = create_block_mask(tree_mask, 1, None, n, n, device="cuda")
    ids, pos = u.input_ids[None].cuda(), u.positions[None].cuda()
    from arborl.components.training.packing import packed_inputs

    _, _, dense = packed_inputs([u], pad, torch.float32)
    with torch.no_grad():
        a = sdpa(input_ids=ids, position_ids=pos, attention_mask=dense.cuda()).logits
        b = flex(input_ids=ids, position_ids=pos, attention_mask=block).logits
    return float((a - b).abs().max())


def main() -> None:
    assert torch.cuda.is_available(), "needs CUDA"
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    pad = 0
    cfg = TrainConfig(grad_clip=1e9, kl_coef=0.0, max_tokens_per_microbatch=16384, micro_batch_size=64)
    # exactness, tiny default-size model (hidden 128, 4 layers), float32 and bfloat16
    small = LlamaConfig(vocab_size=200, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=4, intermediate_size=512, max_position_embeddings=512,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    small._attn_implementation = "sdpa"
    prompts, rows, adv = tree_grpo_trees(16, 200, seed=0)
    small_units = build_units(prompts, rows, adv)
    torch.manual_seed(0)
    model = LlamaForCausalLM(small).cuda()
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        p_stats, p_g = loss_and_grads(m, small_units, "packed", cfg, pad)
        d_stats, d_g = loss_and_grads(m, small_units, "duplicated", cfg, pad)
        name = "fp32" if dtype == torch.float32 else "bf16"
        result[f"max_rel_grad_diff_{name}"] = rel_diff(p_g, d_g)
        result[f"loss_diff_over_scale_{name}"] = abs(p_stats["loss"] - d_stats["loss"]) / d_stats["loss_scale"]
    result["packed_supported"] = trainer.packed_attention_supported(model.float(), pad)
    # speed and memory, a larger Llama in bf16
    big = LlamaConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=16, intermediate_size=4096, max_position_embeddings=2048,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    big._attn_implementation = "sdpa"
    prompts, rows, adv = tree_grpo_trees(32, 32000, seed=1)
    units = build_units(prompts, rows, adv)
    dup_tokens = sum(u.duplicated_tokens for u in units)
    unique_tokens = sum(u.num_tokens for u in units)
    bmodel = LlamaForCausalLM(big).cuda().to(torch.bfloat16)
    tp, mp_ = timed(bmodel, units, "packed", cfg, pad)
    td, md = timed(bmodel, units, "duplicated", cfg, pad)
    result.update({"big_dup_tokens": dup_tokens, "big_unique_tokens": unique_tokens,
                   "big_ideal_speedup": dup_tokens / unique_tokens, "big_packed_s": tp, "big_dup_s": td,
                   "big_packed_speedup": td / tp, "big_cuda_peak_mb_packed": mp_, "big_cuda_peak_mb_dup": md})
    try:
        result["flex_vs_sdpa_max_logit_diff"] = flex_check(small, small_units, pad)
    except Exception as exc:  # report, do not fail the other checks
        result["flex_error"] = f"{type(exc).__name__}: {exc}"[:500]
    text = json.dumps(result, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_training.json").write_text(text)


if __name__ == "__main__":
    main()
