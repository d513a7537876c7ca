# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.robustft-installed

.PHONY: venv demo test lint dryrun clean-results

venv: $(STAMP)

# Pinned: requirements.lock holds every package (torch==2.14.1, torchvision==0.29.1, ...).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: venv
	$(BIN)/snakemake --cores all

test: venv
	$(BIN)/python -m pytest -q --durations=25 tests

lint: venv
	$(BIN)/snakemake --lint

dryrun: venv
	$(BIN)/snakemake -n --cores all

clean-results:
	rm -rf results .snakemake
