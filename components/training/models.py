"""Model and tokenizer factory: a tiny Llama built from config with a word-level tokenizer, saved and
loaded as an ordinary Hugging Face model directory (`AutoModelForCausalLM` + tokenizer files).

A model directory holds `config.json`, its weights in safetensors (`model.safetensors`, or the shards a
`model.safetensors.index.json` lists; pickled `pytorch_model.bin` weights are never loaded) and the fast
tokenizer's `tokenizer.json`. `load_policy` checks these before loading and names the file that is missing or
unreadable (`storage.ArtifactError`).
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from arborl.components.artifacts import local_cache, manifests, model_files, storage
from arborl.components.artifacts.storage import ArtifactError
from arborl.components.config import ModelConfig
from arborl.components.envs.protocol import TAGS

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


def cast_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` with its floating-point tensors in `dtype`; tensors that share memory (tied weights) stay one
    tensor, so `save_pretrained` still stores them once."""
    out: dict[str, torch.Tensor] = {}
    cast: dict[tuple, torch.Tensor] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[name] = tensor
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key not in cast:
            cast[key] = tensor.detach().to(dtype)
        out[name] = cast[key]
    return out


def _save_pretrained(model: torch.nn.Module, directory: str, dtype: str | None,
                     state_dict: dict[str, torch.Tensor] | None) -> None:
    if dtype is None:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
        return
    state = cast_state_dict(state_dict if state_dict is not None else model.state_dict(), DTYPES[dtype])
    saved = model.config.dtype
    try:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state)
        model.config.dtype = dtype  # save_pretrained records the in-memory dtype; the weights are in `dtype`
        model.config.save_pretrained(directory)
    finally:
        model.config.dtype = saved


def save_policy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, uri: str, dtype: str | None = None,
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save as a Hugging Face model directory (safetensors) at `uri` (local or remote).

    `dtype` ("float32", "bfloat16"): the floating-point weights are written in it (the model itself is left as
    it is); None keeps the model's own. `state_dict`: the weights to write instead of the model's (e.g. a
    gathered FSDP state)."""
    if storage.is_local(uri):
        Path(storage.filesystem(uri)[1]).mkdir(parents=True, exist_ok=True)
        _save_pretrained(model, storage.filesystem(uri)[1], dtype, state_dict)
        tokenizer.save_pretrained(storage.filesystem(uri)[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        _save_pretrained(model, tmp, dtype, state_dict)
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
    config.json, ArtifactError (naming the file and what is wrong) otherwise; a directory whose weights were
    pruned (`run.keep_iterations`, components/artifacts/retention.py) is an ArtifactError that says so."""
    manifest = path / manifests.MANIFEST
    pruned = _read_json_file(manifest, storage.join(uri, manifests.MANIFEST)) if manifest.is_file() else None
    pruned = pruned.get("pruned") if isinstance(pruned, dict) else None
    if isinstance(pruned, dict) and pruned.get("weights"):
        raise ArtifactError(f"{uri}: its weights were deleted at {pruned.get('at')} to keep only the last "
                            f"run.keep_iterations={pruned.get('keep_iterations')} iterations (its manifest is marked "
                            "pruned); only the manifest and metrics of this model remain")
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]  # config, weights, tokenizer files


def model_dir(uri: str, cache_max_gb: float | None = local_cache.CACHE_MAX_GB) -> Path:
    """A local directory with the model at `uri`: a local path as it is, an s3:// directory through the bounded
    cache (without optimizer state), and a Hugging Face Hub id (`Qwen/Qwen2.5-3B-Instruct`) that is no local path
    through the Hub's own cache (safetensors and tokenizer files only); a Hub download that fails names the id."""
    if storage.is_local(uri) and _HUB_ID.match(uri) and not Path(uri).exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(uri, allow_patterns=HUB_PATTERNS))
        except Exception as exc:  # offline, unknown repository, gated model: all one line
            raise ArtifactError(f"{uri}: no such local directory, and not downloadable from the Hugging Face Hub "
                                f"({describe_error(exc)})") from exc
    return local_cache.local_dir(uri, max_gb=cache_max_gb, skip=model_files.TRAINING_STATE)


def load_policy(uri: str, device: str = "cpu", cache_max_gb: float | None = local_cache.CACHE_MAX_GB,
                dtype: str = "float32") -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Model (in `dtype`: "float32" or "bfloat16") and tokenizer of the model directory `uri`; every load error
    names `uri` and the file.

    A remote directory is read through the local cache, bounded by `cache_max_gb` (`storage.cache_max_gb`),
    without its optimizer state. A model this process wrote and kept warm (`training/warm.py`) is copied from
    memory instead."""
    from arborl.components.training import warm

    kept = warm.model(uri, device, DTYPES[dtype])
    if kept is not None:
        return kept
    warm.LOADS["disk"] += 1
    path = model_dir(uri, cache_max_gb)
    weights = check_model_dir(path, uri)
    try:
        # PreTrainedTokenizerFast directly: AutoTokenizer may swap in a family's own pre-tokenizer.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as exc:  # tokenizers and transformers raise many types
        raise ArtifactError(f"{storage.join(uri, TOKENIZER_FILE)}: cannot load the tokenizer ({describe_error(exc)})"
                            ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], use_safetensors=True)
    except Exception as exc:  # transformers raises many types; the cause stays chained
        raise ArtifactError(f"{uri}: cannot load the model from {CONFIG_FILE} and {', '.join(weights)} "
                            f"({describe_error(exc)})") from exc
    if dtype == "float32":  # holds the saved values exactly: later loads in this process copy it from memory
        warm.remember(uri, copy.deepcopy(model), tokenizer)
    return model.to(device), tokenizer


def bos(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """[BOS] where the tokenizer defines one (Llama, the word-level tokenizer), else [] (Qwen2.5)."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def prompt_ids(tokenizer: PreTrainedTokenizerFast, prompt: str | list[dict], chat_template: str = "auto"
               ) -> list[int]:
    """Token ids of a prompt as every stage feeds it to the model.

    `prompt`: chat messages (`{"role", "content"}` dicts) or one user message's text. With `chat_template`
    "auto" and a tokenizer that has a template, the messages are rendered by it with the generation prompt (the
    rendered text carries its own special tokens); otherwise the contents, joined by newlines, follow BOS where
    the tokenizer defines one."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return encode(tokenizer, text)
    return bos(tokenizer) + encode(tokenizer, "\n".join(m["content"] for m in messages))


def row_prompt_ids(tokenizer: PreTrainedTokenizerFast, row: dict, chat_template: str = "auto") -> list[int]:
    """`prompt_ids` of a row of the prompts artifact: its chat `messages` (JSON) where it has them, else its
    `prompt` text."""
    messages = row.get("messages")
    return prompt_ids(tokenizer, json.loads(messages) if messages else row["prompt"], chat_template)
