# CPU image that runs the arborl pipeline (`arborl run` on configs/tiny.yaml by default).
#   docker build -t arborl .
#   docker run --rm -v "$PWD/runs:/app/runs" arborl                       # the default run
#   docker run --rm arborl stage evaluate --config configs/tiny.yaml --in model=... --in world=... --out ...
# Sampling image with vLLM (GPU), for `sampling.backend: vllm`: runs the sample stage as a CLI, without Prefect
# or MLflow (vLLM's pins conflict with Prefect's). Built only on request:
#   docker build --target sampler -t arborl-sampler .
#   docker run --gpus all --rm -v "$PWD/runs:/app/runs" arborl-sampler stage sample --config configs/tiny.yaml \
#       --in model=... --in world=... --out ... sampling.backend=vllm
FROM python:3.11-slim AS sampler

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install "vllm>=0.10.2" "pyarrow>=15" "fsspec>=2024.1" "s3fs>=2024.1" "pydantic>=2.7,<3" "pyyaml>=6" \
    "typer>=0.12" "rich>=13"
COPY pyproject.toml README.md ./
COPY components ./components
COPY flows ./flows
COPY configs ./configs
RUN pip install --no-deps . && useradd --create-home arborl && chown -R arborl /app
USER arborl
ENTRYPOINT ["arborl"]
CMD ["stage", "--help"]

# The default target (last stage): the CPU pipeline image.
FROM python:3.11-slim AS pipeline

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1

WORKDIR /app

# A C++ compiler for the CPU attention kernels, built for the CPU they run on (below, and again on first use on
# another CPU model; without a compiler, sampling falls back to torch operations).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# CPU torch first, from PyTorch's CPU wheel index, so the project's "torch>=2.4" is already met.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

COPY pyproject.toml README.md ./
COPY components ./components
COPY flows ./flows
COPY configs ./configs
RUN pip install .

RUN useradd --create-home arborl && chown -R arborl /app
USER arborl

# Build the CPU attention kernels now (~20 s), so a container started on a machine like the builder does not pay
# for it at its first sampling step; on a different CPU model the kernels are rebuilt for it on first use.
RUN python -c "from arborl.components.sampling import cpu_kernels; assert cpu_kernels.decode_attention() is not None"

ENTRYPOINT ["arborl"]
CMD ["run", "--config", "configs/tiny.yaml"]
