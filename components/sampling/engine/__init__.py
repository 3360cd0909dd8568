"""The in-process generation engine: a fast path for Llama-family models behind the `GenerationBackend` contract.

kv_cache (KV buffer and its memory pool) · prefix_cache (KV of earlier sequences, block-indexed) · prefill (cached
prefixes, the KV fork) · backend (`HFBackend`: forward choice, decode loop, cache hand-off) · lean_forward and
fused_forward (Llama forwards over the buffer) · cpu_kernels + cpu_attention.cpp (compiled CPU attention).
"""

from arborl.components.sampling.engine.backend import FORWARDS, HFBackend

__all__ = ["FORWARDS", "HFBackend"]
