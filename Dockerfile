# syntax=docker/dockerfile:1
# Backtrace service image: the API and the RQ workers run from the same image.
#
#   docker build -t backtrace:cpu .                                   # CPU (default)
#   docker build -t backtrace:cuda --build-arg TORCH_VARIANT=cu128 .  # CUDA 12.8 wheels
#   docker build -t backtrace-api --target api .                      # API only, no torch
#
# CUDA images need no CUDA base image: the torch wheels carry the CUDA runtime, the host's
# driver comes in through the NVIDIA container toolkit (`gpus: all` or nvidia.com/gpu).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Heatmap labels (service.heatmap): DejaVu for Latin, Greek and Cyrillic, Noto for CJK.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-dejavu-core fonts-noto-cjk \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv

# --- dependencies of the API alone (no torch) ------------------------------------------------
FROM base AS api-deps
COPY pyproject.toml README.md* /src/
COPY engine /src/engine
COPY service /src/service
# Install the project to get its dependencies, then drop the copy: the code runs from /app.
RUN pip install /src && pip uninstall -y backtrace-service

# --- dependencies of the workers: torch for the chosen variant, then the engine extra ------
FROM base AS engine-deps
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY pyproject.toml README.md* /src/
COPY engine /src/engine
COPY service /src/service
RUN pip install "/src[engine]" && pip uninstall -y backtrace-service

# --- the demo registry: trains / derives the demo models reproducibly, offline, on the CPU ---
FROM engine-deps AS demo
ARG DEMO_DIR=/opt/backtrace/demo
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=/app
COPY engine /app/engine
COPY service /app/service
WORKDIR /app
# The builds land in mkdtemp folders (mode 0700, owner root): open them to the runtime user.
RUN python -m service build-demo --out "${DEMO_DIR}" && chmod -R a+rX "${DEMO_DIR}"

# --- API-only image (smaller; for Kubernetes API pods) ----------------------------------------
FROM base AS api
COPY --from=api-deps /opt/venv /opt/venv
COPY --from=demo /opt/backtrace/demo /opt/backtrace/demo
COPY engine /app/engine
COPY service /app/service
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home backtrace
ENV PYTHONPATH=/app \
    BACKTRACE_REGISTRY=/opt/backtrace/demo/registry.yaml \
    HEALTHCHECK_URL=http://127.0.0.1:8000/healthz
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]
CMD ["python", "-m", "service", "serve", "--host", "0.0.0.0", "--port", "8000"]

# --- full image (default target): API and workers, demo models built in ----------------------
FROM base AS runtime
COPY --from=engine-deps /opt/venv /opt/venv
COPY --from=demo /opt/backtrace/demo /opt/backtrace/demo
COPY engine /app/engine
COPY service /app/service
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home backtrace \
    && mkdir -p /var/cache/backtrace && chown 10001:10001 /var/cache/backtrace
ENV PYTHONPATH=/app \
    BACKTRACE_REGISTRY=/opt/backtrace/demo/registry.yaml \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    BACKTRACE_DATA_DIR=/var/cache/backtrace/models \
    HF_HOME=/var/cache/backtrace/hf \
    MPLCONFIGDIR=/var/cache/backtrace/mpl \
    HEALTHCHECK_URL=http://127.0.0.1:8000/healthz
WORKDIR /app
USER 10001:10001
# 8000: API; 9101: a worker's /metrics and /livez (WORKER_METRICS_PORT; workers set
# HEALTHCHECK_URL to http://127.0.0.1:9101/livez).
EXPOSE 8000 9101
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]
CMD ["python", "-m", "service", "serve", "--host", "0.0.0.0", "--port", "8000"]
