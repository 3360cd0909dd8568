"""Supervised warm start on demonstrations in the agent format; loss only on model-written tokens.

Each step draws `batch_size` demonstrations and packs them into as few rows as fit the longest one
(first-fit decreasing). A packed row restarts positions at every demonstration and a block-diagonal causal
mask keeps them apart, so the loss and gradients are those of the padded batch while the model reads about
a third of the tokens (demonstrations are short next to the longest one).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from arborl.components.config import WarmstartConfig
from arborl.components.envs.demos import Segment
from arborl.components.training.models import bos, encode

Demo = tuple[list[int], list[bool]]


def tokenize_demo(tokenizer, segments: list[Segment]) -> Demo:
    """(input_ids (T,), trainable (T,)) for one demonstration: BOS (where the tokenizer has one), then each
    segment's tokens."""
    ids = bos(tokenizer)
    trainable = [False] * len(ids)
    for text, learn in segments:
        toks = encode(tokenizer, text)
        ids += toks
        trainable += [learn] * len(toks)
    return ids, trainable


def pack_rows(demos: list[Demo]) -> list[list[int]]:
    """Indices of `demos` grouped into rows, first-fit decreasing by length; no row is longer than the longest
    demonstration."""
    width = max(len(ids) for ids, _ in demos)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(demos)), key=lambda i: -len(demos[i][0])):
        n = len(demos[i][0])
        slot = next((r for r, room in enumerate(free) if room >= n), None)
        if slot is None:
            rows.append([i])
            free.append(width - n)
        else:
            rows[slot].append(i)
            free[slot] -= n
    return rows


def packed_batch(demos: list[Demo], pad_id: int, dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The demonstrations packed into rows: input_ids (R, T), position_ids (R, T), an additive attention mask
    (R, 1, T, T) of `dtype` (0 = attend, dtype's min = blocked) and targets (R, T), the next token of the
    same demonstration where that token is trainable, else -100. T is the longest demonstration."""
    rows = pack_rows(demos)
    width = max(len(ids) for ids, _ in demos)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            toks, learn = demos[i]
            n, end = len(toks), start + len(toks)
            t = torch.tensor(toks)
            ids[r, start:end] = t
            pos[r, start:end] = torch.arange(n)
            targets[r, start : end - 1] = torch.where(torch.tensor(learn[1:]), t[1:], torch.tensor(-100))
            allowed[r, start:end, start:end] = causal[:n, :n]
            start = end
    mask = torch.zeros((len(rows), 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return ids, pos, mask, targets


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (R, T, V) against targets (R, T), over the positions whose target is not -100."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def supervised_train(
    model: torch.nn.Module,
    demos: list[Demo],
    cfg: WarmstartConfig,
    pad_id: int,
    seed: int,
    on_step=None,
) -> dict[str, float]:
    """AdamW with linear warm-up and cosine decay; cross-entropy on trainable tokens only, averaged over the
    step's trainable tokens."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
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
        ids, pos, mask, targets = (t.to(device) for t in packed_batch(batch, pad_id, dtype))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = masked_lm_loss(model(input_ids=ids, position_ids=pos, attention_mask=mask).logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, cfg.steps, losses[-1])
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float("nan")]
    return {"loss_final": sum(tail) / len(tail), "loss_first": losses[0] if losses else float("nan"),
            "steps": cfg.steps}
