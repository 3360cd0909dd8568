"""The generation contract: what every backend gives the agent loop, the tree scheduler and evaluation.

A backend takes token ids and returns token ids; text never crosses it, so history is never re-tokenised. One call
is one agent turn for a batch of contexts: each row generates until a stop token, EOS or its own token cap, and
reports the behaviour log-prob of every token it sampled (log-softmax of logits / temperature, float32), why it
stopped, and how many context tokens it actually fed to the model (a backend that reuses cached prefixes feeds
fewer). Backends: the in-process engine (`engine.HFBackend`, `sampling.backend: hf`), the plain reference over
Hugging Face `generate` (`reference_backend`, `generate`) and vLLM (`vllm_backend`, `vllm`); `backends.load_backend`
builds the configured one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from arborl.components.sampling.rng import Generators

STOP_REASONS = ("stop", "eos", "length")


@dataclass
class TurnOutput:
    tokens: list[int]
    logprobs: list[float]  # log-prob of each token under the sampling distribution
    stop: str  # "stop" (a stop token), "eos", or "length" (hit its token cap)
    prefilled: int | None = None  # context tokens actually fed to the model for this row (None: unknown)


@runtime_checkable
class GenerationBackend(Protocol):
    pad_id: int
    eos_id: int

    @property
    def device(self) -> torch.device:
        """Where a shared sampling `torch.Generator` passed to `generate` must live."""
        ...

    def clear_cache(self) -> None:
        """Forget reusable state from earlier calls (cached prefixes), so a seed gives the same tokens whatever
        ran before."""
        ...

    def generate(
        self,
        contexts: list[list[int]],
        max_new_tokens: list[int],
        stop_ids: set[int],
        temperature: float = 1.0,
        greedy: bool = False,
        generator: Generators = None,
    ) -> list[TurnOutput]:
        """One turn per context: at most `max_new_tokens[i]` new tokens, ending at the first token of `stop_ids` or
        EOS (kept in `tokens`). `generator`: one shared, or one per row (a row's tokens then depend on its own
        generator only), or None."""
        ...


def cut_turn(tokens: list[int], stop_ids: set[int], eos_id: int) -> TurnOutput:
    """A row's turn from the tokens it generated: up to and including the first stop token or EOS, else all of
    them (stop reason "length"). Log-probs are left for the caller to fill."""
    for n, tok in enumerate(tokens):
        if tok == eos_id:
            return TurnOutput(tokens[: n + 1], [], "eos")
        if tok in stop_ids:
            return TurnOutput(tokens[: n + 1], [], "stop")
    return TurnOutput(tokens, [], "length")
