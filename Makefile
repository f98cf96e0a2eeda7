# Two entry points (see README): `make serve` and `make test`.
# Both create .venv on first use; torch comes from the pinned CPU wheel
# (`pip install torch==2.13.0`) before the project is installed.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: setup setup-system serve test bench clean image run-image

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard modeling/kernels/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 'setuptools>=77' wheel
	# --no-build-isolation: setup.py builds the native CPU kernels against this torch (needs g++)
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

serve: setup
	$(BIN)/emo-serve $(ARGS)

# System packages: g++ for the native CPU kernels (setup.py; without it the pure-torch path runs), and
# what the tests need: Debian's chromium and its driver for the
# browser test of the /ui page (tests/test_ui.py). Needs root (or sudo) and apt;
# `make test` runs it when chromium is missing.
setup-system:
	@command -v g++ >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y g++; }
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "chromium and chromedriver: installed"; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium chromium-driver; fi
# ... and podman, runc, mmdebstrap and podman-compose for the image test (tests/test_image.py),
# with the podman settings these sandboxed machines need (deploy/podman/containers.conf)
# unless the machine has its own.
	@if [ -x /usr/bin/podman ] && [ -x /usr/sbin/runc ] && [ -x /usr/bin/mmdebstrap ] && [ -x /usr/bin/podman-compose ]; \
	then echo "podman, runc, mmdebstrap, podman-compose: installed"; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y podman runc mmdebstrap podman-compose; fi
	@[ -e /etc/containers/containers.conf ] || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO install -m 644 deploy/podman/containers.conf /etc/containers/containers.conf; }

test: setup
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/podman ] || $(MAKE) setup-system || \
	  echo "make: could not install chromium or podman; tests/test_ui.py or tests/test_image.py will be skipped"
	$(BIN)/python -m pytest -q $(ARGS)

# The container image (Dockerfile; deploy/README.md): podman, a local Debian base made by
# mmdebstrap where there is no image registry, pip's sources of this machine mounted into
# the build. BASE_IMAGE=python:3.11-slim-bookworm builds on the public Python image.
IMAGE          ?= emo-serve:latest
PORT           ?= 8000
IMAGE_PROFILES ?= $(CURDIR)/modeling/bundled/emo-demo/profiles

image:
	$(PYTHON) deploy/build_image.py --tag $(IMAGE) $(if $(BASE_IMAGE),--base $(BASE_IMAGE))

# The bundled demo model with the profiles of IMAGE_PROFILES mounted read-only at /profiles,
# on a read-only root file system, published on 127.0.0.1:PORT.
run-image:
	podman run --rm --read-only -p 127.0.0.1:$(PORT):8000 -v $(IMAGE_PROFILES):/profiles:ro \
	  $(IMAGE) --model /opt/emo-demo --profiles-dir /profiles $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
