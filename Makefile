# Two entry points (see README): `make serve` and `make test`.
# Both create .venv on first use; torch comes from the pinned CPU wheel
# (`pip install torch==2.13.0`) before the project is installed.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: setup setup-system serve test bench clean

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

# System packages the tests need: Debian's chromium and its driver for the
# browser test of the /ui page (tests/test_ui.py). Needs root (or sudo) and apt;
# `make test` runs it when chromium is missing.
setup-system:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "chromium and chromedriver: installed"; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium chromium-driver; fi

test: setup
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || $(MAKE) setup-system || \
	  echo "make: could not install chromium; tests/test_ui.py will be skipped"
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
