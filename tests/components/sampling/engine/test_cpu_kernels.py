"""components.sampling.engine.cpu_kernels: the compiled CPU attention kernels (decode, packed prefill) against torch's
attention, their use by the fused forward, and the fallback when they cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from arborl.components.sampling.engine import HFBackend, cpu_kernels

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler on this machine: the kernel cannot be built")


@pytest.fixture
def kernel():
    module = cpu_kernels.decode_attention()
    assert module is not None, "the kernel did not build although a C++ compiler is present (see the log warning)"
    return module


def _reference(q, keys, values, bias):
    """torch's attention over the same cache: q (b, hq, d), keys/values (b, hkv, width, d), bias (b, width)."""
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=bias[:, None, None], scale=1.0,
                                         enable_gqa=q.shape[1] != keys.shape[1])
    return out.reshape(q.shape[0], -1)


@needs_compiler
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 32), (8, 2, 16), (4, 1, 64), (2, 2, 128)])
def test_kernel_equals_torch_attention_and_appends_the_new_column(kernel, heads, kv_heads, dim):
    """Strided cache views (a buffer wider than what is read), masked padding columns, grouped kv heads: the
    output equals torch's attention over the cache with the new key/value written in, and only that column of the
    cache changes."""
    g = torch.Generator().manual_seed(0)
    batch, capacity, width = 5, 40, 23
    column = width - 1
    q = torch.randn(batch, heads + 3, dim, generator=g)[:, :heads]  # a strided view, as in the fused forward
    buffer = torch.randn(2, batch, kv_heads, capacity + 1, dim, generator=g)
    keys, values = buffer.unbind(0)
    new_k, new_v = torch.randn(2, batch, kv_heads, dim, generator=g).unbind(0)
    bias = torch.zeros(batch, capacity + 1)
    bias[1, 4:15] = float("-inf")  # a short context padded up to the longest one
    bias[3, :column] = float("-inf")  # only the new column is attended to
    expected_cache = buffer.clone()
    expected_cache[0, :, :, column] = new_k
    expected_cache[1, :, :, column] = new_v

    out = kernel.decode_attention(q, new_k, new_v, keys, values, column, bias[:, :width])

    assert torch.equal(buffer, expected_cache)
    ref = _reference(q, keys[:, :, :width], values[:, :, :width], bias[:, :width])
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(out[3].view(heads, dim), new_v[3].repeat_interleave(heads // kv_heads, 0), rtol=0,
                               atol=1e-6)


@needs_compiler
def test_kernel_rejects_bad_input_with_a_clear_message(kernel):
    q = torch.randn(2, 4, 32)
    keys = torch.randn(2, 4, 10, 32)
    new = torch.randn(2, 4, 32)
    bias = torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        kernel.decode_attention(q.double(), new, new, keys, keys, 4, bias)
    with pytest.raises(RuntimeError, match="head dim must be"):
        kernel.decode_attention(q[..., :24], new[..., :24], new[..., :24], keys[..., :24], keys[..., :24], 4, bias)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernel.decode_attention(q, new, new, keys, keys, 10, bias)  # column outside the cache
    with pytest.raises(RuntimeError, match="last dimension must be contiguous"):
        kernel.decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), new, new, keys, keys, 4, bias)


@needs_compiler
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 32), (8, 2, 16), (2, 1, 64)])
def test_packed_attention_equals_causal_attention_over_each_tokens_row(kernel, heads, kv_heads, dim):
    """Flat tokens of several rows, each at its own position: token t attends to columns [0, ends[t]) of its row,
    as torch's attention over that slice computes it; strided q and cache views, grouped kv heads."""
    g = torch.Generator().manual_seed(1)
    batch, capacity = 4, 30
    rows = torch.tensor([0, 0, 0, 2, 3, 3, 1, 2])
    ends = torch.tensor([5, 6, 7, 1, 20, 21, 12, 2])  # a suffix resumed after a cached prefix; a first token
    q = torch.randn(len(rows), heads + 2, dim, generator=g)[:, :heads]
    buffer = torch.randn(2, batch, kv_heads, capacity + 1, dim, generator=g)
    keys, values = (x.narrow(2, 0, capacity) for x in buffer.unbind(0))
    before = buffer.clone()

    out = kernel.packed_attention(q, keys, values, rows, ends)

    assert torch.equal(buffer, before)  # reads only
    for t, (r, e) in enumerate(zip(rows.tolist(), ends.tolist(), strict=True)):
        ref = F.scaled_dot_product_attention(q[t][None, :, None], keys[r, :, :e][None], values[r, :, :e][None],
                                             scale=1.0, enable_gqa=heads != kv_heads)
        torch.testing.assert_close(out[t], ref.reshape(-1), rtol=0, atol=2e-5)


@needs_compiler
def test_packed_attention_rejects_tokens_outside_the_cache(kernel):
    q = torch.randn(2, 4, 32)
    keys = torch.randn(3, 4, 10, 32)
    with pytest.raises(RuntimeError, match="token 1 has row 3 and end 4 outside the cache"):
        kernel.packed_attention(q, keys, keys, torch.tensor([0, 3]), torch.tensor([2, 4]))
    with pytest.raises(RuntimeError, match="token 0 has row 0 and end 11 outside the cache"):
        kernel.packed_attention(q, keys, keys, torch.tensor([0, 1]), torch.tensor([11, 4]))
    with pytest.raises(RuntimeError, match="contiguous int64 CPU tensors"):
        kernel.packed_attention(q, keys, keys, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([2, 4]))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernel.packed_attention(q, keys, keys, torch.tensor([0, 1, 2]), torch.tensor([2, 4, 1]))


@needs_compiler
def test_backend_samples_the_same_through_the_kernel_as_with_matmuls(monkeypatch):
    """A head dim of 32 (the default model's): sampled tokens and their log-probs are the same with the kernels as
    with the torch fallback, over a first call and a second whose contexts extend the first's (a packed prefill of
    uneven suffixes after cached prefixes), and the kernels are what ran."""
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=97, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 1 else (4 / p.shape[-1]) ** 0.5)
    contexts = [torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 3, 17)]

    def two_calls(backend):
        gen = torch.Generator().manual_seed(1)
        first = backend.generate(contexts, [12] * 3, set(), 1.0, False, gen)
        longer = [c + o.tokens + [5] * (2 + 7 * i) for i, (c, o) in enumerate(zip(contexts, first, strict=True))]
        return first + backend.generate(longer, [6] * 3, set(), 1.0, False, gen)

    calls = {"decode": 0, "packed": 0}
    with_kernel = HFBackend(model, 0, -1)
    with_kernel._check_weights()
    module = with_kernel._fused._kernel
    assert module is not None

    class Counting:
        def decode_attention(self, *args):
            calls["decode"] += 1
            return module.decode_attention(*args)

        def packed_attention(self, *args):
            calls["packed"] += 1
            return module.packed_attention(*args)

    with_kernel._fused._kernel = Counting()
    with_kernel._check_weights = lambda: None  # keep the wrapped kernel
    out = two_calls(with_kernel)
    # two layers; every decode step after a prefill; both prefills packed (uneven suffixes)
    assert calls == {"decode": 2 * (11 + 5), "packed": 2 * 2}
    assert [o.prefilled for o in out[3:]] == [3, 10, 17]  # the last sampled token and the new ones: prefixes reused

    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    without = HFBackend(model, 0, -1)
    ref = two_calls(without)
    assert without._fused._kernel is None
    for a, b in zip(out, ref, strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_the_switch_and_a_failed_build_fall_back_to_torch(monkeypatch, caplog):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.decode_attention() is None
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH)

    def broken_build(**_):
        raise OSError("c++: command not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", broken_build)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    with caplog.at_level("WARNING"):
        assert cpu_kernels.decode_attention() is None
    assert "kernel unavailable (OSError: c++: command not found)" in caplog.text


def test_build_name_is_per_cpu_and_per_checkout(monkeypatch, tmp_path):
    """Two checkouts on one machine get two builds: torch's build directory holds absolute source paths, so a
    shared name would make each checkout rebuild the other's."""
    here = cpu_kernels.build_name()
    assert here.startswith(f"arborl_cpu_attention_{cpu_kernels.cpu_tag()}_")
    assert cpu_kernels.build_name() == here  # stable
    monkeypatch.setattr(cpu_kernels, "SOURCE", tmp_path / "cpu_attention.cpp")
    assert cpu_kernels.build_name() != here
