"""LoRA adapters (peft) on the policy: wrap for training, merge for saving.

With `train.lora.enabled` only the adapter matrices train. The model directory a train stage writes is always
the merged one (W + (alpha / r)·B·A), an ordinary Hugging Face model that sampling, evaluation and the
registry load like any other. Next to it go the adapter (`adapter/`, peft format) and a pointer to the base
model it sits on (`lora_base.json`), so the next iteration continues the same adapter, and its Adam moments,
on the same base instead of stacking a fresh adapter on merged weights.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerFast

from arborl.components.artifacts import local_cache, storage
from arborl.components.artifacts.model_files import LORA_BASE_FILE
from arborl.components.artifacts.storage import ArtifactError
from arborl.components.config import LoraSettings
from arborl.components.training.models import check_safetensors, describe_error, load_policy, save_policy

if TYPE_CHECKING:
    from peft import PeftModel

# peft is imported where adapters are made or loaded: the sampler image (vLLM, no peft) imports this module.

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # a pickled adapter_model.bin is never loaded
BASE_FILE = LORA_BASE_FILE


def wrap(model: torch.nn.Module, settings: LoraSettings) -> PeftModel:
    """Freeze `model` and add fresh adapters (B = 0, so the wrapped model computes exactly what `model` did)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.target_modules if t not in names]
    if missing:
        raise ValueError(f"train.lora.target_modules: {missing} not found in the model "
                         f"(linear modules there: {sorted(n for n in names if n.endswith('proj'))})")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def has_adapter(model_uri: str) -> bool:
    return storage.exists(storage.join(model_uri, BASE_FILE))


def load_for_training(
    model_uri: str, settings: LoraSettings, device: str = "cpu", cache_max_gb: float | None = local_cache.CACHE_MAX_GB
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, str | None]:
    """The model to train from the model directory `model_uri`, its tokenizer, and the LoRA base URI.

    LoRA off: the model itself, base None. LoRA on: when `model_uri` was written by a LoRA train stage, its
    adapter reattached (trainable) to the base it points to; otherwise fresh adapters on `model_uri`. Remote
    directories go through the local cache, bounded by `cache_max_gb` (`storage.cache_max_gb`).
    """
    if not settings.enabled:
        model, tokenizer = load_policy(model_uri, device, cache_max_gb)
        return model, tokenizer, None
    if not has_adapter(model_uri):
        model, tokenizer = load_policy(model_uri, device, cache_max_gb)
        return wrap(model, settings), tokenizer, model_uri
    pointer_uri = storage.join(model_uri, BASE_FILE)
    pointer = storage.read_json(pointer_uri)
    base_uri = pointer.get("base") if isinstance(pointer, dict) else None
    if not isinstance(base_uri, str) or not base_uri:
        raise ArtifactError(f"{pointer_uri}: no 'base' model URI in it")
    if not storage.exists(storage.join(base_uri, "config.json")):
        raise FileNotFoundError(f"{model_uri}/{BASE_FILE}: LoRA base model {base_uri} is missing")
    base, tokenizer = load_policy(base_uri, device, cache_max_gb)
    from peft import LoraConfig, PeftModel

    adapter_uri = storage.join(model_uri, ADAPTER_DIR)
    adapter_dir = local_cache.local_dir(adapter_uri, max_gb=cache_max_gb)
    config_uri = storage.join(adapter_uri, ADAPTER_CONFIG_FILE)
    if not (adapter_dir / ADAPTER_CONFIG_FILE).is_file():
        raise ArtifactError(f"{config_uri}: missing (the LoRA adapter of {model_uri} is incomplete)")
    check_safetensors(adapter_dir / ADAPTER_WEIGHTS_FILE, storage.join(adapter_uri, ADAPTER_WEIGHTS_FILE))
    try:
        saved = LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:  # peft raises many types; the cause stays chained
        raise ArtifactError(f"{config_uri}: not a LoRA adapter configuration ({describe_error(exc)})") from exc
    if saved.r != settings.rank or set(saved.target_modules) != set(settings.target_modules):
        raise ValueError(f"{model_uri}: its adapter has rank {saved.r} on {sorted(saved.target_modules)}, "
                         f"the config asks for rank {settings.rank} on {sorted(settings.target_modules)}")
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    except Exception as exc:  # peft raises many types; the cause stays chained
        raise ArtifactError(f"{adapter_uri}: cannot load the LoRA adapter onto {base_uri} ({describe_error(exc)})"
                            ) from exc
    return model.to(device), tokenizer, base_uri


def save_trained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out: str, base_uri: str | None,
                 dtype: str | None = None) -> None:
    """Write the model directory at `out`: merged weights (in `dtype`, `models.save_policy`), plus the adapter
    (in its own dtype) and its base pointer under LoRA.

    Under LoRA this merges `model` in place: do not train it afterwards.
    """
    if base_uri is None:
        save_policy(model, tokenizer, out, dtype=dtype)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        storage.upload_dir(tmp, storage.join(out, ADAPTER_DIR))
    storage.write_json(storage.join(out, BASE_FILE), {"base": base_uri})
    save_policy(model.merge_and_unload(), tokenizer, out, dtype=dtype)
