"""Model and tokenizer factory: a tiny Llama built from config with a word-level tokenizer, saved and
loaded as an ordinary Hugging Face model directory (`AutoModelForCausalLM` + tokenizer files)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from arborl.components import storage
from arborl.components.config import ModelConfig
from arborl.components.envs.protocol import TAGS

hf_logging.disable_progress_bar()

SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


def build_tokenizer(vocab_words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: every word, name part and protocol tag is one token; text splits on spaces."""
    tokens = list(SPECIAL.values()) + TAGS + [w for w in vocab_words if w not in TAGS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL)


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def save_policy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, uri: str) -> None:
    """Save as a Hugging Face model directory (safetensors) at `uri` (local or remote)."""
    if storage.is_local(uri):
        Path(storage.filesystem(uri)[1]).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(storage.filesystem(uri)[1], safe_serialization=True)
        tokenizer.save_pretrained(storage.filesystem(uri)[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        storage.upload_dir(tmp, uri)


def load_policy(uri: str, device: str = "cpu") -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    path = storage.local_dir(uri)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{uri}: not a Hugging Face model directory (no config.json)")
    # PreTrainedTokenizerFast directly: AutoTokenizer may swap in a family's own pre-tokenizer.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    return model, tokenizer


def prompt_ids(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Token ids of a prompt as every stage feeds it to the model: BOS, then the prompt's words."""
    return [tokenizer.bos_token_id] + encode(tokenizer, prompt)
