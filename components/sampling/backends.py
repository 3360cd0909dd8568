"""Build the generation backend a config asks for (`sampling.backend`), for sampling and evaluation alike."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from arborl.components.config import Config
from arborl.components.sampling.generation import GenerationBackend
from arborl.components.training.models import load_policy

BACKENDS = ("hf", "generate", "vllm")


@dataclass
class LoadedBackend:
    backend: GenerationBackend
    tokenizer: PreTrainedTokenizerBase
    context_window: int | None  # the model's max_position_embeddings, where known


def load_backend(cfg: Config, model_uri: str, device: str, batch_size: int = 256) -> LoadedBackend:
    """The model directory at `model_uri` behind the backend named by `sampling.backend`: `hf` (the in-process
    engine), `generate` (Hugging Face `model.generate`, the reference) or `vllm` (needs the `vllm` package: the
    Dockerfile's `sampler` image)."""
    name = cfg.sampling.backend
    if name == "vllm":
        from arborl.components.sampling.vllm_backend import VLLMBackend

        backend, tokenizer = VLLMBackend.from_model_dir(model_uri, seed=cfg.run.seed)
        return LoadedBackend(backend, tokenizer, None)
    model, tokenizer = load_policy(model_uri, device, cfg.storage.cache_max_gb, cfg.model.dtype)
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    if name == "hf":
        from arborl.components.sampling.engine import HFBackend

        backend = HFBackend(model, pad, tokenizer.eos_token_id, batch_size)
    elif name == "generate":
        from arborl.components.sampling.reference_backend import GenerateBackend

        backend = GenerateBackend(model, pad, tokenizer.eos_token_id, batch_size)
    else:
        raise ValueError(f"sampling.backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return LoadedBackend(backend, tokenizer, getattr(model.config, "max_position_embeddings", None))
