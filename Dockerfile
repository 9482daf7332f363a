# syntax=docker/dockerfile:1
# The clipdex image, in two flavors chosen with a build argument:
#
#   docker build -t clipdex:cpu .                          # slim: CPU-only torch, faiss-cpu (~1.5 GB)
#   docker build -t clipdex:cuda --build-arg FLAVOR=cuda .  # CUDA torch wheels, faiss-gpu (~7 GB)
#
# No nvidia/cuda base image is needed: the CUDA builds of torch and faiss-gpu ship CUDA's user-space
# libraries as wheels, and the driver comes from the host through the NVIDIA Container Toolkit. Any other
# base with Python >= 3.11 and pip can be given with --build-arg BASE=...
#
# Model weights are NOT baked in. They download on first use into CLIPDEX_MODEL_CACHE_DIR (/models: mount
# a volume there so they download once), or CLIPDEX_PRETRAINED points to a local checkpoint file.

ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG FLAVOR=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Empty: the PyTorch CPU index for FLAVOR=cpu, PyPI (CUDA 12 wheels) for FLAVOR=cuda.
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

RUN set -eu; \
    case "$FLAVOR" in \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *) echo "FLAVOR must be cpu or cuda, not '$FLAVOR'" >&2; exit 1 ;; \
    esac; \
    pip install --index-url "$index" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The dependencies first, from pyproject.toml alone, so that a source change does not reinstall them.
# For FLAVOR=cuda, faiss-gpu replaces faiss-cpu (both install the module `faiss`; the `gpu` extra).
# The `milvus` extra (pymilvus) lets one image run on either store (CLIPDEX_STORE; compose profile milvus).
WORKDIR /src
COPY pyproject.toml README.md ./
RUN set -eu; \
    for pkg in clipdex shared indexer tools; do mkdir -p "$pkg"; touch "$pkg/__init__.py"; done; \
    pip install ".[milvus]" ; \
    if [ "$FLAVOR" = cuda ]; then \
      pip uninstall -y faiss-cpu; \
      pip install "faiss-gpu>=1.8"; \
    fi; \
    pip uninstall -y clipdex; \
    rm -rf clipdex shared indexer tools build ./*.egg-info

COPY clipdex clipdex
COPY shared shared
COPY indexer indexer
COPY tools tools
RUN pip install --no-deps . && rm -rf build ./*.egg-info


FROM ${BASE}
ARG FLAVOR=cpu
LABEL org.opencontainers.image.title="clipdex" \
      org.opencontainers.image.description="Self-hosted CLIP visual search: streaming indexer, MCP and HTTP search" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.clipdex.flavor="${FLAVOR}"

RUN set -eu; \
    groupadd --system --gid 10001 clipdex; \
    useradd --system --uid 10001 --gid clipdex --create-home --home-dir /home/clipdex clipdex; \
    mkdir -p /data /models /examples /images /app; \
    chown clipdex:clipdex /data /models /examples

COPY --from=build /opt/venv /opt/venv
COPY examples /app/examples

# Named volumes mounted on /data, /models and /examples start out owned by the clipdex user (uid 10001).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CLIPDEX_DATA_DIR=/data \
    CLIPDEX_MODEL_CACHE_DIR=/models \
    HF_HOME=/models/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER clipdex
WORKDIR /app
EXPOSE 8765
CMD ["clipdex", "--help"]
