"""Randomness that belongs to an episode, not to a batch.

Sampling with one `torch.Generator` for a whole batch makes every sequence's tokens depend on which
other sequences share the batch. Sharded sampling must give the same trees whatever the shard layout,
so each episode draws from its own generator, seeded from (run seed, prompt, tree, round, expansion)
and re-seeded per turn: a row's draws depend only on its own seed and position, never on its batch
neighbours or on how long they keep generating.

The named seed streams below derive each of a run's random streams from `run.seed` (and the iteration). Their
values are fixed: changing one changes the results of every run.
"""

from __future__ import annotations

import hashlib

import torch

Generators = torch.Generator | list[torch.Generator] | None


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts, the same in every process (unlike `hash`)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sampling_seed(run_seed: int, iteration: int) -> int:
    """The sample stage's seed of one iteration: its trees' expansion draws and episodes (`sample_trees`)."""
    return run_seed * 100_003 + iteration


def prompt_draw_seed(run_seed: int, iteration: int) -> str:
    """The draw of one iteration's training prompts from the train split (a `random.Random` seed string)."""
    return f"{run_seed}-prompts-{iteration}"


def train_shuffle_seed(run_seed: int, iteration: int) -> int:
    """The train stage's mini-batch shuffles of one iteration (`trainer.policy_update`)."""
    return run_seed * 7919 + iteration


def evaluation_seed(run_seed: int) -> int:
    """Every evaluation's sampled episodes and bootstrap intervals: the same noise for every model of a run."""
    return run_seed + 17


def bench_sampling_seed(run_seed: int, repeat: int) -> int:
    """The sampling benchmark's trees and chains of one timed repeat."""
    return run_seed * 1000 + repeat


def bench_decode_seed(run_seed: int) -> int:
    """The sampling benchmark's draw of the train prompts it times decoding on."""
    return run_seed + 1


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per row; CPU draws keep the stream identical on every device."""
    return [torch.Generator().manual_seed(s) for s in seeds]


def rows(generator: Generators, start: int, end: int) -> Generators:
    """The generators of batch rows [start, end): a slice of a per-row list, a shared generator as is."""
    return generator[start:end] if isinstance(generator, list) else generator


def uniforms(generator: Generators, batch: int, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The uniforms a turn of `steps` tokens draws, float64 in (0, 1], shape (batch, steps), on `device`.

    With per-row generators row i's uniforms are the first `steps` draws of generators[i], whatever the other
    rows; with one shared generator (or None: torch's default) they are one draw for the whole batch.
    """
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} rows")
        u = torch.stack([torch.rand(steps, generator=g, dtype=torch.float64) for g in generator])
    else:
        where = generator.device if generator is not None else "cpu"
        u = torch.rand(batch, steps, generator=generator, dtype=torch.float64, device=where)
    return (1.0 - u).to(device)


def inverse_cdf(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: the first token whose cumulative probability reaches u·total.

    logp: (B, V) log-probabilities; u: (B,) uniforms in (0, 1] on logp's device. Returns (B,) long token ids.
    A token of probability 0 is never drawn (the target is > 0 and a zero step never reaches it first).
    """
    cdf = logp.double().exp().cumsum(-1)
    target = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=logp.shape[-1] - 1)
