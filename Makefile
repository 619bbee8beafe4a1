# Set-up and the two README commands. `make run` and `make test` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adl-installed

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c .ci/constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

run: setup
	$(VENV)/bin/adl pretrain recipes/pretrain/tiny.toml

test: setup
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
