"""Tracking: the MLflow run of a pipeline run (`mlflow_run.py`), the `arborl.*` tag keys (`tags.py`) and the
figures logged to it (`plots.py`)."""
