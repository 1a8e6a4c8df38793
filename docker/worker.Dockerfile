# syntax=docker/dockerfile:1.7
# Render worker, running `archfarm worker`: one container per GPU, or a CPU build (below).
# Build from the repo root:  docker build -f docker/worker.Dockerfile -t archfarm/worker .
# (worker.Dockerfile.dockerignore beside this file keeps .venv, caches and renders out of the context.)
# The CPU build, for machines without NVIDIA (compose's worker-cpu), swaps the base and the torch wheel:
#   --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu

# The torch CUDA wheels bundle their own CUDA runtime, cuBLAS and cuDNN (nvidia-* pip packages), so a
# cudnn-runtime base would only duplicate gigabytes; the `base` flavour still carries the NVIDIA
# container-toolkit settings (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES) and the CUDA compat
# libraries. Keep TORCH_INDEX's CUDA version <= the one in BASE_IMAGE and supported by the host driver.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# --- stage 1: build the project wheel, so the runtime image holds no source tree or build backend ---
FROM python:3.11-slim AS wheel
WORKDIR /src
# README.md is the package's `readme`; setuptools refuses to build without it.
COPY pyproject.toml README.md ./
COPY producer/ producer/
COPY workers/ workers/
COPY shared/ shared/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# --- stage 2: runtime ---
FROM ${BASE_IMAGE} AS runtime
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's python3 is 3.12 (the project needs >= 3.10). gcc, libc6-dev and python3-dev stay in the
# runtime image on purpose: Triton (torch.compile's GPU backend) compiles a small C launcher at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

# torch first and in its own layer: it is by far the largest and changes least often. The constraint
# file stops any later install from swapping the chosen build for PyPI's (`torch==X` matches `X+cu128`).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}" \
 && echo "torch==${TORCH_VERSION}" > "$VIRTUAL_ENV/torch-constraint.txt"

RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --constraint "$VIRTUAL_ENV/torch-constraint.txt" /wheels/*.whl \
 && archfarm --help > /dev/null

# Everything a worker downloads or compiles lives on the /models volume, so a container restart or an
# image upgrade does not re-download weights or recompile kernels.
ENV ARCHFARM_MODELS_DIR=/models \
    HF_HOME=/models/hf \
    TORCHINDUCTOR_CACHE_DIR=/models/inductor \
    TRITON_CACHE_DIR=/models/triton

# Created and owned before VOLUME, so a fresh named volume starts out writable by the worker user.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin archfarm \
 && mkdir -p /models/hf /models/inductor /models/triton \
 && chown -R archfarm:archfarm /models
VOLUME ["/models"]

USER archfarm
WORKDIR /home/archfarm

# Exec form: the worker gets SIGTERM itself (through `init: true`'s tini in compose) and finishes the
# render in progress before exiting.
ENTRYPOINT ["archfarm", "worker"]
CMD ["--devices", "auto"]
