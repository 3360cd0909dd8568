# CPU image that runs the arborl pipeline (`arborl run` on configs/tiny.yaml by default) and, with
# `orchestration.executor: docker`, each of its stages (`arborl stage NAME ...`).
#   docker build -t arborl .
#   docker run --rm -v "$PWD/runs:/app/runs" arborl                       # the default run
#   docker run --rm arborl stage evaluate --config configs/tiny.yaml --in model=... --in world=... --out ...
# Without a registry (podman, a base image made from Debian packages, pip as this machine has it configured):
#   infra/container/make-base-image.sh && infra/container/build-image.sh       # docs/operations.md, "Images"
# Build arguments:
#   BASE_IMAGE       a Python 3.11 image with python and pip on PATH (default python:3.11-slim)
#   TORCH_INDEX_URL  where CPU torch comes from (default PyTorch's CPU wheel index); empty: pip's own
#                    configuration in the build (a find-links folder with the wheel, a mirror)
# Sampling image with vLLM (GPU), for `sampling.backend: vllm`: runs the sample stage as a CLI, without Prefect
# or MLflow (vLLM's pins conflict with Prefect's). Built only on request:
#   docker build --target sampler -t arborl-sampler .
#   docker run --gpus all --rm -v "$PWD/runs:/app/runs" arborl-sampler stage sample --config configs/tiny.yaml \
#       --in model=... --in world=... --out ... sampling.backend=vllm
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS sampler

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install "vllm>=0.10.2" "pyarrow>=15" "fsspec>=2024.1" "s3fs>=2024.1" "pydantic>=2.7,<3" "pyyaml>=6" \
    "typer>=0.12" "rich>=13"
COPY pyproject.toml README.md ./
COPY components ./components
COPY flows ./flows
COPY configs ./configs
RUN pip install --no-deps . && useradd --create-home --uid 1000 arborl && chown -R arborl /app
USER arborl
ENTRYPOINT ["arborl"]
CMD ["stage", "--help"]

# The default target (last stage): the CPU pipeline image.
FROM ${BASE_IMAGE} AS pipeline

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

# HOME and the kernel cache are the image's, writable by any uid: stage containers run as the invoking user's
# uid:gid (so what they write in a mounted output root is that user's) and find the prebuilt kernels there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    HOME=/home/arborl \
    TORCH_EXTENSIONS_DIR=/home/arborl/.cache/torch_extensions \
    MPLCONFIGDIR=/home/arborl/.cache/matplotlib

WORKDIR /app

# A C++ compiler for the CPU attention kernels, built for the CPU they run on (below, and again on first use on
# another CPU model; without a compiler, sampling falls back to torch operations).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# CPU torch first, so the project's "torch>=2.4" is already met and nothing pulls a CUDA build.
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"; \
    else pip install "torch==$TORCH_VERSION"; fi

# The dependencies from pyproject.toml alone, in their own layer: a change to the code does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > /tmp/requirements.txt && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

COPY README.md ./
COPY components ./components
COPY flows ./flows
COPY configs ./configs
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 arborl \
    && mkdir -p "$TORCH_EXTENSIONS_DIR" "$MPLCONFIGDIR" \
    && chown -R arborl /app /home/arborl

USER arborl

# Build the CPU attention kernels now (~20 s), so a container started on a machine like the builder does not pay
# for it at its first sampling step; on a different CPU model the kernels are rebuilt for it on first use.
RUN python -c "from arborl.components.sampling.engine import cpu_kernels; assert cpu_kernels.decode_attention() is not None" \
    && chmod -R a+rwX /home/arborl

# build-image.sh removes earlier builds of this image that no tag names any more (by this label)
LABEL arborl.image=pipeline
ENTRYPOINT ["arborl"]
CMD ["run", "--config", "configs/tiny.yaml"]
