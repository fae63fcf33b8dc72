# `make example` and `make test` work on a fresh clone: the first call creates .venv and installs.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[flows,test]'
	touch $@

.PHONY: install example test
install: $(VENV)/.installed

example: $(VENV)/.installed
	$(VENV)/bin/maptools example

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q
