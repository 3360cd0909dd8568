"""Supervised warm start on demonstrations in the agent format; loss only on model-written tokens."""

from __future__ import annotations

import math
import random

import torch

from arborl.components.config import WarmstartConfig
from arborl.components.envs.demos import Segment
from arborl.components.models import bos, encode


def tokenize_demo(tokenizer, segments: list[Segment]) -> tuple[list[int], list[bool]]:
    """(input_ids (T,), trainable (T,)) for one demonstration: BOS (where the tokenizer has one), then each
    segment's tokens."""
    ids = bos(tokenizer)
    trainable = [False] * len(ids)
    for text, learn in segments:
        toks = encode(tokenizer, text)
        ids += toks
        trainable += [learn] * len(toks)
    return ids, trainable


def supervised_train(
    model: torch.nn.Module,
    demos: list[tuple[list[int], list[bool]]],
    cfg: WarmstartConfig,
    pad_id: int,
    seed: int,
    on_step=None,
) -> dict[str, float]:
    """AdamW with linear warm-up and cosine decay; cross-entropy on trainable tokens only."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    losses = []
    for step in range(cfg.steps):
        batch = [demos[rng.randrange(len(demos))] for _ in range(cfg.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (toks, learn) in enumerate(batch):
            t = torch.tensor(toks)
            ids[i, : len(toks)] = t
            attn[i, : len(toks)] = 1
            labels[i, : len(toks)] = torch.where(torch.tensor(learn), t, torch.tensor(-100))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        if on_step is not None:
            on_step(step + 1, cfg.steps, losses[-1])
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float("nan")]
    return {"loss_final": sum(tail) / len(tail), "loss_first": losses[0] if losses else float("nan"),
            "steps": cfg.steps}
