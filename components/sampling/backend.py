"""Hugging Face generation backend: one agent turn for a batch of contexts, with behaviour log-probs.

The interface is deliberately narrow (token ids in, token ids + log-probs out) so another engine can
stand in for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.sampling import rng


@dataclass
class TurnOutput:
    tokens: list[int]
    logprobs: list[float]  # log-prob of each token under the sampling distribution
    stop: str  # "stop" (a stop token), "eos", or "length" (hit max_new_tokens)


class HFBackend:
    def __init__(self, model: torch.nn.Module, pad_id: int, eos_id: int, batch_size: int = 256):
        self.model = model
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        contexts: list[list[int]],
        max_new_tokens: list[int],
        stop_ids: set[int],
        temperature: float = 1.0,
        greedy: bool = False,
        generator: rng.Generators = None,
    ) -> list[TurnOutput]:
        out: list[TurnOutput] = []
        for start in range(0, len(contexts), self.batch_size):
            end = start + self.batch_size
            batch = contexts[start:end], max_new_tokens[start:end]
            out.extend(self._generate_batch(*batch, stop_ids, temperature, greedy, rng.rows(generator, start, end)))
        return out

    def _generate_batch(self, contexts, max_new, stop_ids, temperature, greedy, generator) -> list[TurnOutput]:
        self.model.eval()
        dev = self.device
        b = len(contexts)
        width = max(len(c) for c in contexts)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, c in enumerate(contexts):  # left padding keeps every sequence's last token in the last column
            ids[i, width - len(c) :] = torch.tensor(c)
            mask[i, width - len(c) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        res = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, logits = res.cache, res.logits[:, -1, :].float()
        last_pos = positions[:, -1]

        limits = torch.tensor(max_new, device=dev)
        stops = torch.tensor(sorted(stop_ids), device=dev)
        tokens = torch.zeros((b, int(limits.max())), dtype=torch.long, device=dev)
        logps = torch.zeros((b, int(limits.max())), device=dev)
        lengths = torch.zeros(b, dtype=torch.long, device=dev)
        done = limits <= 0
        stop_kind = torch.zeros(b, dtype=torch.long, device=dev)  # 0 length, 1 stop, 2 eos
        for t in range(int(limits.max())):
            logp = torch.log_softmax(logits / temperature, dim=-1)
            if greedy:
                nxt = logp.argmax(-1)
            else:
                nxt = rng.sample_next(logp, generator)
            live = ~done
            tokens[live, t] = nxt[live]
            logps[live, t] = logp.gather(-1, nxt[:, None]).squeeze(-1)[live]
            lengths += live.long()
            hit_stop = live & torch.isin(nxt, stops)
            hit_eos = live & (nxt == self.eos_id)
            stop_kind[hit_stop] = 1
            stop_kind[hit_eos] = 2
            done = done | hit_stop | hit_eos | (lengths >= limits)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=dev)], dim=1)
            last_pos = last_pos + 1
            res = self.model(
                input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                cache=cache, use_cache=True,
            )
            cache, logits = res.cache, res.logits[:, -1, :].float()
        kinds = {0: "length", 1: "stop", 2: "eos"}
        result = []
        for i in range(b):
            n = int(lengths[i])
            result.append(TurnOutput(tokens[i, :n].tolist(), logps[i, :n].tolist(), kinds[int(stop_kind[i])]))
        return result
