# ditscale: two commands on a fresh machine — `make quickstart` and `make test`.
PY      ?= python3
VENV    ?= .venv
PIP      = $(VENV)/bin/pip
PYTHON   = $(VENV)/bin/python
STAMP    = $(VENV)/.ditscale-installed

.PHONY: setup quickstart test test-fast lint constraints clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

quickstart: setup
	$(PYTHON) -m ditscale.quickstart

test: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PYTHON) -m pytest

test-fast: setup
	PATH=$(abspath $(VENV))/bin:$$PATH $(PYTHON) -m pytest -m "not slow and not distributed and not slurm"

# ruff (lint: pyproject's rule set; format check) over the tree, mypy (basic mode) over ditscale/ and data_prep/.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

constraints:
	$(PIP) freeze --exclude-editable | grep -v '^-e' > constraints.txt.new
	@echo "review and move constraints.txt.new to constraints.txt (keep the two header lines)"

clean-venv:
	rm -rf $(VENV)
