# Two commands do all the set-up on a fresh machine:
#   make run    builds .venv and runs the pipeline on configs/tiny.yaml
#   make test   builds .venv and runs the test suite (make test-container: the podman container tests)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/tiny.yaml

.PHONY: run test test-fast test-container install lint clean

$(BIN)/arborl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU torch first: with it present nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The CPU attention kernel is compiled here, once, rather than inside the first run (it falls back if it can't).
	$(BIN)/python -c "from arborl.components.sampling.engine.cpu_kernels import decode_attention; decode_attention()"
	touch $(BIN)/arborl

install: $(BIN)/arborl

run: install
	$(BIN)/arborl run --config $(CONFIG) $(ARGS)

test: install
	$(BIN)/pytest -q $(ARGS)

test-fast: install  # the unit tier: no flow, server, browser or container tests
	$(BIN)/pytest -q -m "not slow" $(ARGS)

test-container: install  # builds the pipeline image and runs stages in podman containers (infra/container/)
	$(BIN)/pytest -q -m container $(ARGS)

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
