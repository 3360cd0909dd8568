"""`arborl bench warmstart`: the warm start's packed rows against the padded batch they replace.

Both forms compute the loss and gradients of the same demonstration batches (drawn as the warm start draws
them) on the same model, alternating, `repeats` times; times are medians of one forward+backward. The padded
form is the plain one: one row per demonstration, right-padded to the longest, the attention mask hiding the
padding.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import torch

from arborl.components.artifacts import storage
from arborl.components.config import Config
from arborl.components.envs.world import vocabulary
from arborl.components.stages import STAGES
from arborl.components.stages.base import device
from arborl.components.stages.warmstart import demonstrations
from arborl.components.training.models import build_model, build_tokenizer
from arborl.components.training.warmstart import Demo, masked_lm_loss, packed_batch, tokenize_demo


def padded_batch(demos: list[Demo], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (B, T), attention_mask (B, T) and targets (B, T) (next token where trainable, else -100)."""
    width = max(len(ids) for ids, _ in demos)
    ids = torch.full((len(demos), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(demos), width), dtype=torch.long)
    targets = torch.full((len(demos), width), -100, dtype=torch.long)
    for i, (toks, learn) in enumerate(demos):
        t = torch.tensor(toks)
        ids[i, : len(toks)], attn[i, : len(toks)] = t, 1
        targets[i, : len(toks) - 1] = torch.where(torch.tensor(learn[1:]), t[1:], torch.tensor(-100))
    return ids, attn, targets


def _step(model, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    masked_lm_loss(model(**inputs).logits, targets).backward()
    if targets.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, [p.grad.detach().clone() for p in model.parameters()]


def bench_warmstart(cfg: Config, workdir: str, repeats: int = 10) -> dict[str, Any]:
    """Padded vs packed forward+backward on `repeats` warm-start batches of the config's world and model."""
    world_uri = STAGES["prepare"](cfg, {}, storage.join(workdir, "prepare")).out  # reused when already there
    world, episodes = demonstrations(cfg, world_uri)
    tokenizer = build_tokenizer(vocabulary(world))
    demos = [tokenize_demo(tokenizer, ep) for ep in episodes]
    dev = device(cfg)
    model = build_model(cfg.model, tokenizer, cfg.run.seed).to(dev)
    rng = random.Random(cfg.run.seed)
    pad = tokenizer.pad_token_id
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    tokens = {"real": 0, "padded": 0, "packed": 0}
    worst = 0.0
    for r in range(repeats + 1):
        batch = [demos[rng.randrange(len(demos))] for _ in range(cfg.warmstart.batch_size)]
        ids, attn, targets = (t.to(dev) for t in padded_batch(batch, pad))
        t_pad, g_pad = _step(model, {"input_ids": ids, "attention_mask": attn}, targets)
        p_ids, pos, mask, p_targets = (t.to(dev) for t in packed_batch(batch, pad))
        t_pack, g_pack = _step(model, {"input_ids": p_ids, "position_ids": pos, "attention_mask": mask}, p_targets)
        worst = max(worst, max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                               for a, b in zip(g_pack, g_pad, strict=True)))
        if r == 0:
            continue  # an untimed warm-up
        times["padded"].append(t_pad)
        times["packed"].append(t_pack)
        tokens["real"] += sum(len(d[0]) for d in batch)
        tokens["padded"] += ids.numel()
        tokens["packed"] += p_ids.numel()
    padded, packed = statistics.median(times["padded"]), statistics.median(times["packed"])
    return {
        "batch_size": cfg.warmstart.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "real_tokens_per_batch": tokens["real"] / repeats,
        "padded_tokens_per_batch": tokens["padded"] / repeats,
        "packed_tokens_per_batch": tokens["packed"] / repeats,
        "padded_seconds": padded,
        "packed_seconds": packed,
        "packed_speedup": padded / packed,
        "max_rel_grad_diff": worst,
    }
