# `make example` and `make test` work on a fresh clone: the first call creates .venv and installs.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[flows,store,test]'
	touch $@

.PHONY: install example test
install: $(VENV)/.installed

# Runs the quantize-model Prefect flow on ResNet18 (Prefect starts a temporary local server).
example: $(VENV)/.installed
	PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
		$(VENV)/bin/maptools flow example

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q
