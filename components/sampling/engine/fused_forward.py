"""The fused forward for float32 Llama-family decoders: the lean forward's math over folded, concatenated copies of
the weights, with fewer and larger operations (see `FusedLlama`). Tested against the model's own logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arborl.components.sampling.engine import cpu_kernels
from arborl.components.sampling.engine.lean_forward import attention, supports

STATIC_ROPE = ("default", "linear", "llama3")  # rotary tables that do not depend on the sequence seen so far
HEAD_DIMS = (8, 16, 32, 64, 128, 256)  # head dims the compiled decode-attention kernel is built for


class FusedLlama:
    """The lean forward with fewer, larger operations, for a CPU where a small model's step is mostly per-op cost.

    Built once per set of weights (the backend rebuilds it when a parameter changes):
    * q, k and v projections are one matrix, gate and up another;
    * RMSNorm's weight is folded into the matrix it feeds: W·(g ⊙ x / √(‖x‖²/d + ε)) = (W·diag(g)·√d)·(x / √(‖x‖² +
      dε)), so a norm costs a vector norm, three in-place ops on one number per token, and one scaling (of the
      matrix output, or of x for gate/up, whose output is several times wider);
    * the attention scale is folded into the q rows (rotary is linear, so it commutes);
    * rotary runs as a complex multiplication: the q and k rows of each head are permuted so that the pairs
      rotate-half mixes (i, i + d/2) sit side by side; q·k is unchanged by a permutation applied to both, and the
      keys are cached in that order (only this forward reads them);
    * residual adds ride on `addmm`; the additive attention bias is built once per call by the caller.
    The math is the Hugging Face forward's, reordered (tested against the model's logits). It holds a copy of
    the layer weights, so it is meant for models that fit a CPU.
    """

    def __init__(self, model: torch.nn.Module):
        inner, config = model.model, model.config
        self.num_layers = config.num_hidden_layers
        first = inner.layers[0].self_attn
        d = self.head_dim = first.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.embed = inner.embed_tokens.weight.detach()
        self.rotary = inner.rotary_emb
        root_d = config.hidden_size**0.5
        self.d_eps = config.hidden_size * inner.norm.variance_epsilon
        self.lm_head = (model.lm_head.weight * inner.norm.weight[None] * root_d).detach().t()
        pairs = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()
        q_rows, k_rows = self.heads * d, self.kv_heads * d
        order = torch.cat([(h * d + pairs) for h in range(self.heads + self.kv_heads)]
                          + [torch.arange(q_rows + k_rows, q_rows + 2 * k_rows)])
        self.layers = []
        for layer in inner.layers[: self.num_layers]:
            a, m = layer.self_attn, layer.mlp
            g1 = layer.input_layernorm.weight[None] * root_d
            g2 = layer.post_attention_layernorm.weight[None] * root_d
            qkv = torch.cat([a.q_proj.weight * a.scaling, a.k_proj.weight, a.v_proj.weight])
            qkv_bias = None
            if a.q_proj.bias is not None:
                qkv_bias = torch.cat([a.q_proj.bias * a.scaling, a.k_proj.bias, a.v_proj.bias])[order].detach()
            self.layers.append((
                (qkv * g1)[order].detach().t(),
                qkv_bias,
                a.o_proj.weight.detach().t(),
                (torch.cat([m.gate_proj.weight, m.up_proj.weight]) * g2).detach().t(),
                F.silu if type(m.act_fn).__name__ in ("SiLU", "SiLUActivation") else m.act_fn,
                m.down_proj.weight.detach().t(),
            ))
        self._rotation = None
        # decode and packed prefill attention on a CPU: the compiled kernels where they build (see cpu_kernels),
        # else batched matmuls
        usable = not self.embed.is_cuda and d in HEAD_DIMS
        self._kernel = cpu_kernels.decode_attention() if usable else None

    @property
    def packed_kernel(self) -> bool:
        """Whether a packed forward attends through the compiled kernel (causal by position; no bias needed)."""
        return self._kernel is not None

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """float32 Llama-family models with plain (not adapter-wrapped) linear layers, bias only on q/k/v, static
        rope. (In bfloat16 the folded weights would be rounded once more than the model's own: not the same model.)"""
        if not supports(model) or any(p.dtype != torch.float32 for p in model.parameters()):
            return False
        config = model.config
        rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        if rope.get("rope_type", rope.get("type", "default")) not in STATIC_ROPE:
            return False
        eps = model.model.norm.variance_epsilon if hasattr(model.model.norm, "variance_epsilon") else None
        for layer in model.model.layers[: config.num_hidden_layers]:
            a, m = layer.self_attn, layer.mlp
            linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
            if any(type(x) is not torch.nn.Linear for x in linears):
                return False
            if any(x.bias is not None for x in (a.o_proj, m.gate_proj, m.up_proj, m.down_proj)):
                return False
            if len({a.q_proj.bias is None, a.k_proj.bias is None, a.v_proj.bias is None}) > 1:
                return False
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(getattr(n, "variance_epsilon", None) != eps for n in norms):
                return False
        return eps is not None

    def rotary_table(self, length: int, device: torch.device) -> None:
        """Precompute the complex rotations (cos + i·sin) of positions [0, length) (grown on demand)."""
        if self._rotation is not None and self._rotation.shape[0] >= length and self._rotation.device == device:
            return
        grid = torch.arange(max(length, 256), device=device)[None]
        cos, sin = self.rotary(self.embed[:1], grid)
        half = self.head_dim // 2
        self._rotation = torch.complex(cos[0, :, :half], sin[0, :, :half])

    def _project(self, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None,
                 scale_input: bool = False) -> torch.Tensor:
        """RMSNorm(x) times a folded matrix, given transposed (hidden, out): x: (tokens, hidden) → (tokens, out).
        The per-token scale goes on the output, or with `scale_input` on x, which is cheaper for gate/up (its
        output is several times wider than x). For q/k/v and the head, scaling x was measured to more than double
        the logit error against the model's own forward (on a test model with large weights): they scale the
        output."""
        scale = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().add_(self.d_eps).rsqrt_()
        y = torch.mm(x * scale, weight_t) if scale_input else torch.mm(x, weight_t).mul_(scale)
        return y if bias is None else y.add_(bias)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`attention` (scale already in q) with batched matmuls called directly, returning the heads side by side:
        q: (batch, heads, q_len, dim); k, v: (batch, kv_heads, width, dim) → (batch · q_len, heads · dim)."""
        b, hq, s, d = q.shape
        if q.is_cuda or q.dtype != torch.float32:
            o = attention(q, k, v, bias, 1.0)
        else:
            hkv, width = k.shape[1], k.shape[2]
            group = hq // hkv
            q = q.reshape(b * hkv, group * s, d)
            scores = torch.bmm(q, k.reshape(b * hkv, width, d).transpose(1, 2))
            scores.view(b, hkv, group, s, width).add_(bias[:, :, None])
            probs = torch.softmax(scores, dim=-1)
            o = torch.bmm(probs, v.reshape(b * hkv, width, d)).view(b, hq, s, d)
        return o.view(b, hq * d) if s == 1 else o.transpose(1, 2).reshape(b * s, hq * d)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache, bias: torch.Tensor | None,
                max_position: int | None = None, packed: tuple | None = None) -> torch.Tensor:
        """ids, positions: (batch, q_len) long; bias: (batch, 1, q_len, width) float, 0 = attend, -inf = not (None
        only for a packed forward through the kernel, see `packed_kernel`);
        `max_position`: an upper bound of `positions` if the caller knows one (saves a device sync).

        `packed` = (slots, batch, q_len, last): the tokens come flat instead — ids, positions (tokens,) — with
        token j in slot slots[j] of the (batch · q_len) query grid, and last[i] the index of row i's last token.
        The projections and the MLP then run over the real tokens only; attention runs over the grid (`cache`
        must be planned with flat rows/cols), or on a CPU with the compiled kernel over the real tokens only, each
        attending to its row's columns [0, position] — a packed prefill's bias must say exactly that (the
        backend's does: a context fills its row from column 0). Prefills of uneven suffixes (a one-token resume
        beside a 40-token observation) spend nothing on padding.

        Writes every layer's keys/values into `cache` (through `cache.update`, or in a decode step on a CPU the
        compiled kernel writes them at `cache.col`) and returns float32 logits (batch, vocab) of the last slot (of
        each row's last token when packed).
        """
        hq, hkv, d = self.heads, self.kv_heads, self.head_dim
        if packed is None:
            b, s = ids.shape
        else:
            slots, b, s, last = packed
        self.rotary_table((int(positions.max()) if max_position is None else max_position) + 1, ids.device)
        rotation = self._rotation[positions]  # (batch, q_len, d/2) or (tokens, d/2), complex
        rotation = rotation[:, None] if packed is None else rotation[:, None, :]
        h = F.embedding(ids, self.embed).view(-1, self.embed.shape[1])
        kernel_step = (self._kernel is not None and packed is None and s == 1
                       and getattr(cache, "col", None) is not None and cache.data is not None)
        if self._kernel is not None and packed is not None:  # each flat token attends its row's columns [0, end)
            token_rows, token_ends = torch.div(slots, s, rounding_mode="floor"), positions + 1
        for idx, (qkv_t, qkv_b, o_t, gate_up_t, act, down_t) in enumerate(self.layers):
            qkv = self._project(h, qkv_t, qkv_b)
            qkv = qkv.view(b, s, hq + 2 * hkv, d).transpose(1, 2) if packed is None else qkv.view(-1, hq + 2 * hkv, d)
            pairs = torch.view_as_complex(qkv[:, : hq + hkv].unflatten(-1, (d // 2, 2)))
            qk = torch.view_as_real(pairs * rotation).flatten(-2)
            if kernel_step:  # the kernel writes this step's key/value into the cache and attends, in one call
                keys, values = cache.layer_kv(idx)
                o = self._kernel.decode_attention(qk[:, :hq, 0], qk[:, hq:, 0], qkv[:, hq + hkv :, 0], keys, values,
                                                  cache.col, bias[:, 0, 0])
            elif packed is None:
                k, v = cache.update(qk[:, hq:], qkv[:, hq + hkv :], idx)
                o = self._attention(qk[:, :hq], k, v, bias)
            elif self._kernel is not None:
                k, v = cache.update(qk[:, hq:], qkv[:, hq + hkv :], idx)
                o = self._kernel.packed_attention(qk[:, :hq], k, v, token_rows, token_ends)
            else:
                k, v = cache.update(qk[:, hq:], qkv[:, hq + hkv :], idx)
                grid = qk.new_zeros(b * s, hq, d)
                grid[slots] = qk[:, :hq]
                o = self._attention(grid.view(b, s, hq, d).transpose(1, 2), k, v, bias)[slots]
            h = torch.addmm(h, o, o_t)
            gu = self._project(h, gate_up_t, scale_input=True)
            half = gu.shape[-1] // 2
            if act is F.silu:  # in place in gu's first half: no new tensors
                gated = F.silu(gu[:, :half], inplace=True).mul_(gu[:, half:])
            else:
                gated = act(gu[:, :half]) * gu[:, half:]
            h = torch.addmm(h, gated, down_t)
        last_h = h.view(b, s, -1)[:, -1] if packed is None else h[last]
        return self._project(last_h, self.lm_head).float()
