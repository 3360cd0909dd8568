"""components.training.lora: peft adapters train alone, and the merged save computes what the adapters did."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from arborl.components.config import LoraSettings
from arborl.components.training.lora import ADAPTER_DIR, BASE_FILE, load_for_training, save_trained, wrap
from arborl.components.training.models import load_policy, save_policy

SETTINGS = LoraSettings(enabled=True, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])


def _batch(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (4, 12), generator=g)


def _lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _train(model, ids: torch.Tensor, steps: int = 15) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _lm_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lora_trains_only_the_adapters(tiny_model, tokenizer):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model = wrap(tiny_model, SETTINGS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = _batch(len(tokenizer))
    losses = _train(model, ids)
    assert losses[-1] < losses[0] - 0.2
    state = model.get_base_model().state_dict()
    after = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert after.keys() == base.keys()
    assert [k for k, v in base.items() if not torch.equal(after[k], v)] == []
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)


def test_fresh_adapters_do_not_change_the_outputs(tiny_model, tokenizer):
    ids = _batch(len(tokenizer), seed=1)
    with torch.no_grad():
        before = tiny_model(input_ids=ids).logits.clone()
        after = wrap(tiny_model, SETTINGS)(input_ids=ids).logits
    assert torch.equal(before, after)


def test_merged_save_gives_the_adapter_models_logits(tiny_model, tokenizer, tmp_path):
    base_dir, out = str(tmp_path / "base"), str(tmp_path / "trained")
    save_policy(tiny_model, tokenizer, base_dir)
    model, tok, base_uri = load_for_training(base_dir, SETTINGS)
    assert base_uri == base_dir
    ids = _batch(len(tokenizer), seed=2)
    _train(model, _batch(len(tokenizer)))
    model.eval()
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits.clone()
    save_trained(model, tok, out, base_uri)

    tensors = load_file(str(tmp_path / "trained" / "model.safetensors"))
    assert not any("lora" in k for k in tensors)  # a plain Hugging Face model
    merged, _ = load_policy(out)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)
    assert not torch.allclose(merged_logits, tiny_model(input_ids=ids).logits, atol=1e-3)

    # the next iteration picks the same adapter up again, on the original base
    assert (tmp_path / "trained" / ADAPTER_DIR).is_dir() and (tmp_path / "trained" / BASE_FILE).is_file()
    again, _, again_base = load_for_training(out, SETTINGS)
    assert again_base == base_dir
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, adapter_logits, atol=1e-5, rtol=0)
    assert all("lora_" in n for n, p in again.named_parameters() if p.requires_grad)


def test_lora_off_trains_the_plain_model(tiny_model, tokenizer, tmp_path):
    save_policy(tiny_model, tokenizer, str(tmp_path / "m"))
    model, _, base_uri = load_for_training(str(tmp_path / "m"), LoraSettings(enabled=False))
    assert base_uri is None and not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_target_module_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"target_modules.*\['c_attn'\]"):
        wrap(tiny_model, LoraSettings(enabled=True, target_modules=["q_proj", "c_attn"]))


def test_adapter_of_another_rank_is_refused(tiny_model, tokenizer, tmp_path):
    save_policy(tiny_model, tokenizer, str(tmp_path / "base"))
    model, tok, base_uri = load_for_training(str(tmp_path / "base"), SETTINGS)
    save_trained(model, tok, str(tmp_path / "out"), base_uri)
    with pytest.raises(ValueError, match="rank 4"):
        load_for_training(str(tmp_path / "out"), SETTINGS.model_copy(update={"rank": 2}))

