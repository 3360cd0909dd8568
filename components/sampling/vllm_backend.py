"""vLLM generation backend: the `GenerationBackend` contract, on an offline `vllm.LLM`.

Prompts go in as token ids (`TokensPrompt`), so the agent loop and the tree logic are unchanged; automatic
prefix caching plays the part of the HF backend's prefix reuse (a tree's branches and an episode's next turn
share their prefix blocks). Log-probs are vLLM's *processed* ones — after temperature — i.e.
log-softmax(logits / T) of the sampled token, what the trainer's ratio needs.

vLLM pins its own torch/transformers and cannot share an environment with Prefect: install the `vllm` extra
in its own image (`docker build --target sampler .`) and run the sample stage there as a CLI
(`arborl stage sample ... sampling.backend=vllm`). Nothing here imports vllm until a backend is built.

Stop strings (`StopStrings`) go to vLLM as `stop` strings, matched on its detokenized output (so the engine keeps
its tokenizer and requests that carry them are detokenized), with the stop string kept in the output: vLLM then
returns the tokens through the one that completed it. The turn is cut again by `cut_turn` on those token ids, so it
ends exactly where the other backends end it even where vLLM's text differs from the token texts (special tokens
it skips, or an engine built without a tokenizer, which ignores stop strings).
"""

from __future__ import annotations

import torch

from arborl.components.artifacts import local_cache, model_files
from arborl.components.sampling.generation import StopStrings, TurnOutput, cut_turn


def _vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "sampling.backend=vllm needs the `vllm` package, which is not installed in this environment; "
            "install the extra (`pip install 'arborl[vllm]'`) in a separate environment or use the `sampler` "
            "image of the Dockerfile"
        ) from exc
    return vllm


class VLLMBackend:
    """Wraps a `vllm.LLM`; a `GenerationBackend`."""

    def __init__(self, llm, pad_id: int, eos_id: int):
        self.llm = llm
        self.pad_id = pad_id
        self.eos_id = eos_id

    @classmethod
    def from_model_dir(cls, uri: str, seed: int = 0, gpu_memory_utilization: float = 0.85, **llm_kwargs):
        """(backend, tokenizer) for a Hugging Face model directory (local or remote URI)."""
        from transformers import PreTrainedTokenizerFast

        vllm = _vllm()
        path = str(local_cache.local_dir(uri, skip=model_files.TRAINING_STATE))  # no optimizer state
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        llm = vllm.LLM(
            model=path,
            tokenizer=path,
            # token ids in and out; the tokenizer only detokenizes requests with stop strings, for vLLM's check
            skip_tokenizer_init=False,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            **llm_kwargs,
        )
        return cls(llm, tokenizer.pad_token_id, tokenizer.eos_token_id), tokenizer

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the sampling generator lives: it only draws per-request seeds

    def clear_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def generate(
        self,
        contexts: list[list[int]],
        max_new_tokens: list[int],
        stop_ids: set[int],
        temperature: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        *,
        stop_strings: StopStrings | None = None,
    ) -> list[TurnOutput]:
        """See `GenerationBackend.generate`; `generator` (one shared, or one per row) draws each request's vLLM seed."""
        stop = {} if stop_strings is None else {"stop": list(stop_strings.texts), "include_stop_str_in_output": True}
        vllm = _vllm()
        results: list[TurnOutput | None] = [None] * len(contexts)
        prompts, params, rows = [], [], []
        for i, (ctx, limit) in enumerate(zip(contexts, max_new_tokens, strict=True)):
            if limit <= 0:
                results[i] = TurnOutput([], [], "length", 0)
                continue
            row_gen = generator[i] if isinstance(generator, list) else generator
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=row_gen))
            params.append(vllm.SamplingParams(
                n=1,
                temperature=0.0 if greedy else temperature,
                top_p=1.0,
                top_k=-1,
                max_tokens=limit,
                stop_token_ids=sorted(stop_ids),
                ignore_eos=False,
                logprobs=0,  # the sampled token's log-prob only
                seed=None if greedy else seed,
                detokenize=stop_strings is not None,  # vLLM matches stop strings on its detokenized text
                **stop,
            ))
            prompts.append({"prompt_token_ids": list(ctx)})
            rows.append(i)
        if prompts:
            for i, request in zip(rows, self.llm.generate(prompts, params, use_tqdm=False), strict=True):
                results[i] = self._turn(request, len(contexts[i]), stop_ids, stop_strings)
        return results  # type: ignore[return-value]

    def _turn(self, request, context_len: int, stop_ids: set[int], stop_strings: StopStrings | None) -> TurnOutput:
        """A request's turn. With stop strings it is cut where `cut_turn` cuts it (vLLM returns the tokens through
        the one that completed a stop string, and with them keeps the stop string in its text, nothing after it);
        where `cut_turn` finds no end, the tokens and stop reason are vLLM's (e.g. a generation-config EOS)."""
        out = request.outputs[0]
        tokens = list(out.token_ids)
        logprobs = [float(step[tok].logprob) for tok, step in zip(tokens, out.logprobs or [], strict=True)]
        if len(logprobs) != len(tokens):
            raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(tokens)} tokens")
        if out.finish_reason == "length":
            stop = "length"
        elif tokens and tokens[-1] == self.eos_id and out.stop_reason is None:
            stop = "eos"
        else:
            stop = "stop"
        if stop_strings is not None:
            cut = cut_turn(tokens, stop_ids, self.eos_id, stop_strings)
            if cut.stop != "length":
                tokens, logprobs, stop = cut.tokens, logprobs[: len(cut.tokens)], cut.stop
        cached = getattr(request, "num_cached_tokens", None)
        return TurnOutput(tokens, logprobs, stop, None if cached is None else context_len - cached)
