"""Model and tokenizer factory: a tiny Llama built from config with a word-level tokenizer, saved and
loaded as an ordinary Hugging Face model directory (`AutoModelForCausalLM` + tokenizer files).

A model directory holds `config.json`, its weights in safetensors (`model.safetensors`, or the shards a
`model.safetensors.index.json` lists; pickled `pytorch_model.bin` weights are never loaded) and the fast
tokenizer's `tokenizer.json`. `load_policy` checks these before loading and names the file that is missing or
unreadable (`storage.ArtifactError`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from arborl.components import storage
from arborl.components.config import ModelConfig
from arborl.components.envs.protocol import TAGS
from arborl.components.storage import ArtifactError

hf_logging.disable_progress_bar()

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLED_WEIGHTS_FILE = "pytorch_model.bin"
TOKENIZER_FILE = "tokenizer.json"

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


def describe_error(exc: BaseException) -> str:
    """The first line of an exception's message, with its type: enough for a one-line error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def check_safetensors(path: Path, uri: str) -> None:
    """Parse the header of the safetensors file at `path` (the local copy of `uri`) and check that its data is
    all there; raises ArtifactError naming `uri` when it is missing, truncated or not safetensors."""
    if not path.is_file():
        raise ArtifactError(f"{uri}: missing")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{uri}: not a safetensors file or truncated ({describe_error(exc)})") from exc


def _read_json_file(path: Path, uri: str) -> object:
    try:
        return json.loads(path.read_bytes())
    except ValueError as exc:
        raise ArtifactError(f"{uri}: not a JSON file or truncated ({exc})") from exc


def check_model_dir(path: Path, uri: str) -> list[str]:
    """Check the local model directory `path` (the copy of `uri`): config.json, safetensors weights and
    tokenizer.json present and readable. Returns the weight file names; raises FileNotFoundError without
    config.json, ArtifactError (naming the file and what is wrong) otherwise."""
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{uri}: not a Hugging Face model directory (no {CONFIG_FILE})")
    if not isinstance(_read_json_file(path / CONFIG_FILE, storage.join(uri, CONFIG_FILE)), dict):
        raise ArtifactError(f"{storage.join(uri, CONFIG_FILE)}: not a model configuration (no JSON object)")
    if (path / WEIGHTS_FILE).exists():
        weights = [WEIGHTS_FILE]
    elif (path / WEIGHTS_INDEX_FILE).exists():
        index_uri = storage.join(uri, WEIGHTS_INDEX_FILE)
        index = _read_json_file(path / WEIGHTS_INDEX_FILE, index_uri)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ArtifactError(f"{index_uri}: no weight_map of tensor names to files")
        weights = sorted(set(weight_map.values()))
    else:
        pickled = (path / PICKLED_WEIGHTS_FILE).exists()
        raise ArtifactError(f"{uri}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE})"
                            + (f"; pickled {PICKLED_WEIGHTS_FILE} weights are not loaded" if pickled else ""))
    for name in weights:
        check_safetensors(path / name, storage.join(uri, name))
    if not (path / TOKENIZER_FILE).is_file():
        raise ArtifactError(f"{uri}: no {TOKENIZER_FILE} (the model directory lacks its tokenizer files; "
                            "save the tokenizer there with save_pretrained)")
    return weights


def load_policy(uri: str, device: str = "cpu", cache_max_gb: float | None = storage.CACHE_MAX_GB
                ) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Model and tokenizer of the model directory `uri`; every load error names `uri` and the file.

    A remote directory is read through the local cache, bounded by `cache_max_gb` (`storage.cache_max_gb`),
    without its optimizer state."""
    path = storage.local_dir(uri, max_gb=cache_max_gb, skip=storage.TRAINING_STATE)
    weights = check_model_dir(path, uri)
    try:
        # PreTrainedTokenizerFast directly: AutoTokenizer may swap in a family's own pre-tokenizer.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as exc:  # tokenizers and transformers raise many types
        raise ArtifactError(f"{storage.join(uri, TOKENIZER_FILE)}: cannot load the tokenizer ({describe_error(exc)})"
                            ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    except Exception as exc:  # transformers raises many types; the cause stays chained
        raise ArtifactError(f"{uri}: cannot load the model from {CONFIG_FILE} and {', '.join(weights)} "
                            f"({describe_error(exc)})") from exc
    return model.to(device), tokenizer


def prompt_ids(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Token ids of a prompt as every stage feeds it to the model: BOS, then the prompt's words."""
    return [tokenizer.bos_token_id] + encode(tokenizer, prompt)
