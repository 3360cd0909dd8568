"""The reference backend (`sampling.backend: generate`): each turn is one Hugging Face `model.generate` call.

It works for any causal LM `generate` supports and keeps nothing between calls, so it is the yardstick the engine
is tested against (greedy tokens equal; behaviour log-probs within float32 tolerance). It is slower: every turn
feeds its whole context, and identical contexts are fed once each.

Sampling is plain: temperature only (no top-k, top-p or repetition penalty, whatever the model's generation config
says), so the log-probs it reports are those of the distribution it sampled from. Contexts are left-padded in a
batch. With one generator per row, each row runs alone from a seed drawn from its own generator, so its tokens do
not depend on its batch; with one shared generator a batch draws one seed.

Stop strings (`StopStrings`) stop a row through a `StoppingCriteria` that advances each row's text tail by the token
it sampled, with the same check the engine runs; the turn is then cut by `cut_turn`, which repeats it.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from arborl.components.sampling import rng
from arborl.components.sampling.generation import StopStrings, TurnOutput, cut_turn


class _StopStringCriteria(StoppingCriteria):
    """Whether each row's generated text (its tokens after column `width`) contains one of `stop_strings`. Called
    by `generate` once per step with `input_ids` (batch, width + tokens so far); advances each row's text tail by the
    tokens it has not seen, and once a row has hit a stop string keeps reporting it done."""

    def __init__(self, stop_strings: StopStrings, width: int, batch: int):
        self.stop_strings = stop_strings
        self.width = width
        self.tails = [""] * batch
        self.done = [False] * batch
        self.seen = 0  # generated tokens already advanced over

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None,
                 **kwargs) -> torch.BoolTensor:
        """input_ids: (batch, width + generated). Returns (batch,) bool on its device."""
        new = input_ids[:, self.width + self.seen:].tolist()
        self.seen = input_ids.shape[1] - self.width
        for i, toks in enumerate(new):
            for tok in toks:
                if self.done[i]:
                    break
                self.tails[i], self.done[i] = self.stop_strings.advance(self.tails[i], tok)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class GenerateBackend:
    """A `GenerationBackend` over `model.generate`."""

    def __init__(self, model: torch.nn.Module, pad_id: int, eos_id: int, batch_size: int = 64):
        self.model = model
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def clear_cache(self) -> None:
        """Nothing is kept between calls."""

    @torch.no_grad()
    def generate(
        self,
        contexts: list[list[int]],
        max_new_tokens: list[int],
        stop_ids: set[int],
        temperature: float = 1.0,
        greedy: bool = False,
        generator: rng.Generators = None,
        *,
        stop_strings: StopStrings | None = None,
    ) -> list[TurnOutput]:
        """See `GenerationBackend.generate`."""
        self.model.eval()
        if isinstance(generator, list):
            if len(generator) != len(contexts):
                raise ValueError(f"{len(generator)} generators for {len(contexts)} rows")
            groups = [[i] for i in range(len(contexts))]
        else:
            groups = [list(range(s, min(s + self.batch_size, len(contexts))))
                      for s in range(0, len(contexts), self.batch_size)]
        out: list[TurnOutput | None] = [None] * len(contexts)
        for rows in groups:
            gen = generator[rows[0]] if isinstance(generator, list) else generator
            turns = self._generate_group([contexts[i] for i in rows], [max_new_tokens[i] for i in rows], stop_ids,
                                         temperature, greedy, gen, stop_strings)
            for i, turn in zip(rows, turns, strict=True):
                out[i] = turn
        return out  # type: ignore[return-value]

    def _generate_group(self, contexts: list[list[int]], limits: list[int], stop_ids: set[int], temperature: float,
                        greedy: bool, generator: torch.Generator | None,
                        stop_strings: StopStrings | None = None) -> list[TurnOutput]:
        steps = max(limits)
        if steps <= 0:
            return [TurnOutput([], [], "length", len(c)) for c in contexts]
        dev = self.device
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(contexts):
            ids[i, width - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[i, width - len(c):] = 1
        config = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else temperature, top_k=None, top_p=None,
            repetition_penalty=None, max_new_tokens=steps, min_new_tokens=0,
            eos_token_id=sorted(stop_ids | {self.eos_id}), pad_token_id=self.pad_id, bos_token_id=None,
            output_logits=True, return_dict_in_generate=True,
        )
        criteria = StoppingCriteriaList(
            [] if stop_strings is None else [_StopStringCriteria(stop_strings, width, len(contexts))])
        where = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=where))
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            res = self.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=config,
                                      stopping_criteria=criteria)
        new = res.sequences[:, width:]
        logits = torch.stack(res.logits, dim=1).float()  # (batch, new tokens, vocab): raw, before temperature
        logp = torch.log_softmax(logits / temperature, dim=-1)
        token_logps = logp.gather(2, new[:, : logp.shape[1], None]).squeeze(2)
        turns = []
        for i, (c, limit) in enumerate(zip(contexts, limits, strict=True)):
            turn = cut_turn(new[i, : max(limit, 0)].tolist(), stop_ids, self.eos_id, stop_strings)
            turn.logprobs = token_logps[i, : len(turn.tokens)].tolist()
            turn.prefilled = len(c)
            turns.append(turn)
        return turns
