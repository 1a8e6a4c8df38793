# syntax=docker/dockerfile:1.7
# CPU image for everything that does not render: the CLI, the REST API and `archfarm db upgrade`.
# Build from the repo root:  docker build -f docker/producer.Dockerfile -t archfarm/producer .
# (producer.Dockerfile.dockerignore beside this file keeps .venv, caches and renders out of the context.)

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
FROM python:3.11-slim AS runtime
ARG TORCH_VERSION=2.13.0
# The CPU wheel: the producer imports torch (the package requires it) but never renders on a GPU, and
# PyPI's default build would pull in gigabytes of CUDA libraries.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The constraint file stops the project install from swapping the CPU build for PyPI's (`torch==X`
# matches `X+cpu`).
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv "$VIRTUAL_ENV" \
 && pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}" \
 && echo "torch==${TORCH_VERSION}" > "$VIRTUAL_ENV/torch-constraint.txt"

RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --constraint "$VIRTUAL_ENV/torch-constraint.txt" /wheels/*.whl \
 && archfarm --help > /dev/null

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin archfarm
USER archfarm
WORKDIR /home/archfarm

# `archfarm api --host 0.0.0.0 --port 8000` in compose.
EXPOSE 8000
ENTRYPOINT ["archfarm"]
CMD ["--help"]
