# syntax=docker/dockerfile:1
#
# emo-serve container image.
#
#   CPU (default):  docker build -t emo-serve:cpu .
#   CUDA 12.8:      docker build --build-arg TORCH_INDEX=cu128 -t emo-serve:cu128 .
#   this project's machines (podman, no image registry): make image   (deploy/build_image.py)
#
#   docker run --rm --read-only -p 127.0.0.1:8000:8000 emo-serve:cpu          # the bundled demo
#   docker run --rm --read-only -p 127.0.0.1:8000:8000 -v "$PWD/profiles:/profiles:ro" \
#     emo-serve:cpu --model /opt/emo-demo --profiles-dir /profiles              # demo + mounted profiles
#
# BASE_IMAGE: any Debian-based image with python3 (3.11+) and its venv module.
# The default is the public Python slim image; machines without a registry use a
# Debian base made by mmdebstrap (`make image` builds and picks it).
# TORCH_INDEX picks PyTorch's wheel index (https://download.pytorch.org/whl/<index>):
# `cpu`, or a CUDA build such as `cu126` / `cu128`, whose wheels carry their own
# CUDA libraries (the final stage only needs the host's NVIDIA driver and container
# toolkit: `docker run --gpus all ... --device cuda`). Empty: pip's configured
# sources, as `make setup` does (a local wheel mirror; `make image` mounts it).
# See deploy/README.md.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- deps: g++ and a virtual environment with torch and the project's dependencies ----
FROM ${BASE_IMAGE} AS deps

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DEBIAN_FRONTEND=noninteractive

# g++ builds the project's C++ torch extension (when the tree has one) against the
# installed torch. The python image carries Python's headers; Debian's python3 needs
# python3-dev for them.
# hadolint ignore=DL3008
RUN pyinc="$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))')" \
    && dev="$(test -f "$pyinc/Python.h" || echo python3-dev)" \
    && apt-get update \
    && apt-get install -y --no-install-recommends g++ ${dev:+"$dev"} \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first (its own layer: it is most of the image and changes least), then the
# build tools `pip install --no-build-isolation` uses from this venv.
RUN pip install ${TORCH_INDEX:+--index-url "https://download.pytorch.org/whl/${TORCH_INDEX}"} "torch==${TORCH_VERSION}" \
    && pip install setuptools==84.2.1 wheel==0.48.0

# The project's dependencies in their own layer, keyed on pyproject.toml alone, so that
# a change to the code rebuilds only the project's stage.
WORKDIR /src
COPY pyproject.toml ./
RUN python -P -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# ---- builder: the project, into /opt/emo (outside the venv) ----
FROM deps AS builder

# The build context is an allowlist (.dockerignore): pyproject.toml, README.md,
# setup.py when present, and the packages. A regular (non-editable) install, compiled
# to bytecode (the root file system is read-only at run time), into /opt/emo: the
# package, its bundled demo model, the console scripts (run by /opt/venv/bin/python),
# and a C++ torch extension when the tree has one. Kept out of the venv so that a
# change to the code leaves the venv's 1.5 GB layer of the final image as it was.
# `python -P`: the installed package, not the sources in the working directory.
COPY . .
RUN pip install --no-build-isolation --no-deps --target /opt/emo . \
    && PYTHONPATH=/opt/emo python -P -c "import server.cli"

# What the final stage adds to the base besides the venv and /opt/emo, prepared here so
# that the final stage has no RUN step (mounts given to `podman build --volume` leave
# empty mount points in every layer a RUN step makes): the non-root user, the mount
# points, and /opt/emo-demo, the bundled demo model, for
# `--model /opt/emo-demo --profiles-dir /profiles`.
RUN groupadd --system --gid 10001 emo \
    && useradd --system --uid 10001 --gid emo --no-create-home --home-dir /nonexistent \
               --shell /usr/sbin/nologin emo \
    && mkdir -p /rootfs/etc /rootfs/opt /rootfs/models /rootfs/profiles \
    && cp /etc/passwd /etc/group /rootfs/etc/ \
    && ln -s /opt/emo/modeling/bundled/emo-demo /rootfs/opt/emo-demo

# ---- venv: the dependencies' venv as the final image has it ----
# No pip, setuptools or wheel (the python image keeps its own, outside the venv;
# Debian's python3 has none), and /opt/emo on its path.
FROM deps AS venv
RUN python -P -c "import site; print('/opt/emo', file=open(site.getsitepackages()[0] + '/emo-serve.pth', 'w'))" \
    && pip uninstall --yes pip setuptools wheel

# ---- final: the same base, the venv, the project, a non-root user; no compiler, no RUN step ----
FROM ${BASE_IMAGE} AS runtime

ARG TORCH_INDEX=cpu
LABEL org.opencontainers.image.title="emo-serve" \
      org.opencontainers.image.description="Serves mixture-of-experts models loading only the experts a domain needs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.emo-serve.torch-index="${TORCH_INDEX}"

COPY --from=venv /opt/venv /opt/venv
COPY --from=builder /opt/emo /opt/emo
COPY --from=builder /rootfs/ /

# HOME and caches on /tmp so the image runs with a read-only root file system
# (`--read-only`, compose `read_only: true`, k8s `readOnlyRootFilesystem: true`);
# /tmp is a volume, so it stays writable there.
ENV PATH=/opt/emo/bin:/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1
VOLUME ["/tmp"]

USER 10001:10001
WORKDIR /tmp

EXPOSE 8000

# No curl in the image: the check is Python's urllib against /health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# 0.0.0.0 inside the container only: publish the port on the host deliberately
# (`-p 127.0.0.1:8000:8000`), or not at all behind the router. Arguments given to
# `docker run` / compose `command:` / k8s `args:` replace CMD and are appended to
# these; none (the default) serves the bundled demo model with its bundled profiles.
ENTRYPOINT ["emo-serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
