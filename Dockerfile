# syntax=docker/dockerfile:1
#
# emo-serve container image.
#
#   CPU (default):  docker build -t emo-serve:cpu .
#   CUDA 12.8:      docker build --build-arg TORCH_INDEX=cu128 -t emo-serve:cu128 .
#
#   docker run --rm -p 127.0.0.1:8000:8000 \
#     -v "$PWD/models:/models:ro" -v "$PWD/profiles:/profiles:ro" \
#     emo-serve:cpu --model /models/emo-demo --profiles-dir /profiles
#
# TORCH_INDEX picks PyTorch's wheel index (https://download.pytorch.org/whl/<index>):
# `cpu`, or a CUDA build such as `cu126` / `cu128`; the CUDA wheels carry their own
# CUDA libraries, so the final stage stays a plain Python image and only needs the
# host's NVIDIA driver and container toolkit (`docker run --gpus all ... --device cuda`).
# See deploy/README.md.

ARG PYTHON_VERSION=3.11

# ---- builder: a virtual environment with torch and emo-serve, nothing else ----
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from PyTorch's own index, so `pip install .` finds it satisfied.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY modeling ./modeling
COPY server ./server
COPY subsetting ./subsetting
COPY clients ./clients
COPY training ./training
# A regular (non-editable) install: the package, its bundled demo model and the
# console scripts land in /opt/venv. Then drop the installers: the final image
# has no pip, setuptools or wheel, and no compiler was ever installed.
RUN pip install --no-cache-dir . \
    && pip uninstall --yes pip setuptools wheel \
    && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

# ---- final: slim Python, the venv, a non-root user ----
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

ARG TORCH_INDEX=cpu
LABEL org.opencontainers.image.title="emo-serve" \
      org.opencontainers.image.description="Serves mixture-of-experts models loading only the experts a domain needs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.emo-serve.torch-index="${TORCH_INDEX}"

# The base image's own pip/setuptools/wheel go too: nothing in this stage builds or installs.
RUN python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 emo \
    && useradd --system --uid 10001 --gid emo --no-create-home --home-dir /nonexistent \
               --shell /usr/sbin/nologin emo \
    && mkdir -p /models /profiles

COPY --from=builder /opt/venv /opt/venv

# HOME and caches on /tmp so the image runs with a read-only root file system
# (compose `read_only: true`, k8s `readOnlyRootFilesystem: true` plus a /tmp volume).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1

USER 10001:10001
WORKDIR /tmp

EXPOSE 8000

# No curl in the image: the check is Python's urllib against /health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# 0.0.0.0 inside the container only: publish the port on the host deliberately
# (`-p 127.0.0.1:8000:8000`), or not at all behind the router. Arguments given to
# `docker run` / compose `command:` / k8s `args:` are appended to these.
ENTRYPOINT ["emo-serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
