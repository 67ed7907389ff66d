# The two commands: `make run` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LINT_DIRS := events spoolfs projections cli tests $(wildcard bench)

.PHONY: run test install system-deps lint unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# compat: the checkout on sys.path through a .pth, instead of an import
	# finder that costs every `spool` command 10 ms at start. setuptools calls
	# the mode transitional: when it is gone, the default editable install.
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat 2>/dev/null \
		|| $(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests need (real peers). Installs only what is missing.
system-deps:
	bash .ci/system-deps

lint: install
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: install
	$(VENV)/bin/pytest

test: system-deps install lint unit

# The server on the embedded default: data in var/ of this checkout, SMTP on
# 127.0.0.1:2525, loopback clients trusted to relay, `localhost` a local domain.
run: install
	$(VENV)/bin/spool serve --mynetworks 127.0.0.0/8 --local-domain localhost

bench: install
	@echo "see BENCHMARKS.md for the command of each figure"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
