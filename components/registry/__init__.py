"""The model registry: the pure promotion gate (`gate.py`), MLflow registry I/O (`store.py`) and the gated
promotion (`promotion.py`), which gets its evaluator passed in."""
