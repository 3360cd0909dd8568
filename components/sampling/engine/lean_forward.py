"""The lean forward for Llama-family decoders (Llama, Mistral, Qwen2) over the engine's KV buffer.

The same modules and the same math as the Hugging Face forward (the model's own projections, norms, MLP and rotary
embedding, so LoRA-wrapped layers and bf16 work too), minus the per-call machinery around them — keyword plumbing,
output capturing, mask construction — which dominates a small model's decode step.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")


def supports(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    return (
        getattr(config, "model_type", None) in SUPPORTED
        and not getattr(config, "use_sliding_window", False)
        and getattr(config, "sliding_window", None) is None
        and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
        and hasattr(model, "lm_head")
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v with grouped kv heads. q: (batch, heads, q_len, dim); k, v: (batch, kv_heads,
    width, dim); bias: (batch, 1, q_len, width) float, 0 or -inf. Returns (batch, heads, q_len, dim).

    On a CPU in float32, plain matmuls: for one or a few query slots against a cache view they ran ~2x faster
    than `scaled_dot_product_attention` with a mask. Elsewhere (CUDA, bf16) the fused kernel, which keeps the
    scores in float32.
    """
    b, h, s, d = q.shape
    kv_heads = k.shape[1]
    if q.is_cuda or q.dtype != torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale,
                                              enable_gqa=h != kv_heads)
    group = h // kv_heads
    q = q.reshape(b, kv_heads, group * s, d)
    scores = torch.matmul(q, k.transpose(-1, -2)).view(b, kv_heads, group, s, -1)
    if scale != 1.0:
        scores = scores * scale
    probs = torch.softmax(scores.add_(bias[:, :, None]), dim=-1)
    return torch.matmul(probs.view(b, kv_heads, group * s, -1), v).view(b, h, s, d)


def forward(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache, bias: torch.Tensor):
    """ids, positions: (batch, q_len) long; bias: (batch, 1, q_len, width) float, 0 = attend, -inf = not.

    Writes every layer's keys/values through `cache.update` and returns float32 logits (batch, vocab) of the
    last slot.
    """
    inner = model.model
    h = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(h, positions)
    b, s, _ = h.shape
    for idx, layer in enumerate(inner.layers[: model.config.num_hidden_layers]):
        attn = layer.self_attn
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
        q, k = rotate(q, k, cos, sin)
        k, v = cache.update(k, v, idx)
        o = attention(q, k, v, bias, attn.scaling)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, s, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = inner.norm(h[:, -1:])
    return model.lm_head(h)[:, -1, :].float()
