"""Randomness that belongs to an episode, not to a batch.

Sampling with one `torch.Generator` for a whole batch makes every sequence's tokens depend on which
other sequences share the batch. Sharded sampling must give the same trees whatever the shard layout,
so each episode draws from its own generator, seeded from (run seed, prompt, tree, round, expansion)
and re-seeded per turn: a row's draws depend only on its own seed and position, never on its batch
neighbours or on how long they keep generating.
"""

from __future__ import annotations

import hashlib

import torch

Generators = torch.Generator | list[torch.Generator] | None


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, the same in every process (unlike `hash`)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per row; CPU draws keep the stream identical on every device."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def rows(generator: Generators, start: int, end: int) -> Generators:
    """The generators of batch rows [start, end): a slice of a per-row list, a shared generator as is."""
    return generator[start:end] if isinstance(generator, list) else generator


def sample_rows(logp: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse-CDF sampling, row i drawing its uniform from generators[i].

    logp: (B, V) log-probabilities (any device). Returns (B,) long token ids on logp's device.
    """
    if len(generators) != logp.shape[0]:
        raise ValueError(f"{len(generators)} generators for {logp.shape[0]} rows")
    u = 1.0 - torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])  # in (0, 1]
    cdf = logp.double().exp().cumsum(-1)
    target = (u.to(logp.device) * cdf[:, -1])[:, None]
    # the first token whose cumulative probability reaches the target; target > 0 so it has p > 0
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=logp.shape[-1] - 1)


def sample_next(logp: torch.Tensor, generator: Generators) -> torch.Tensor:
    """The next token of every row: per-row generators when given a list, else one multinomial draw
    for the batch from the shared generator (the batch-level stream, as before).

    logp: (B, V) log-probabilities. Returns (B,) long token ids.
    """
    if isinstance(generator, list):
        return sample_rows(logp, generator)
    return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
