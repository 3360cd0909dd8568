"""components.bench.iteration: the model I/O bench on a small architecture (real files on disk); the before/after
runs are in tests/flows/test_bench_iteration.py (they run flows)."""

from __future__ import annotations

from arborl.components.bench import iteration


def test_model_io_measures_weights_and_state_of_an_architecture(tmp_path, monkeypatch):
    small = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
             "max_position_embeddings": 128, "tie_word_embeddings": True}
    monkeypatch.setitem(iteration.MODEL_CONFIGS, "small-qwen2", small)
    out = iteration.model_io("small-qwen2", str(tmp_path), checkpoint_every=4)
    params = out["parameters"]
    assert 2 * params <= out["weights_bytes"] < 2 * params + 200_000  # bf16 weights, plus config and tokenizer
    # Adam's two moments and fp32 master weights: 12 bytes per parameter, plus the pickle's framing
    assert 12 * params <= out["training_state_bytes"] < 12 * params + 200_000
    assert out["bytes_per_iteration_after"] == out["weights_bytes"] + out["training_state_bytes"] / 4
    assert not any(tmp_path.iterdir())  # the bench cleans up
