# `make example` and `make test` work on a fresh clone: the first call creates .venv and installs.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[flows,store,test,docs]'
	touch $@

.PHONY: install example test docs serve-docs
install: $(VENV)/.installed

# Runs the quantize-model Prefect flow on ResNet18 (Prefect starts a temporary local server).
example: $(VENV)/.installed
	PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
		$(VENV)/bin/maptools flow example

# two processes (pytest-xdist); --dist loadfile keeps each file, and each docs page's examples, in one
# process, as Sybil's pages share one namespace (plain `pytest` runs everything serially)
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

# The documentation site (docs/, mkdocs.yml) into site/; reference pages are generated from the code.
MKDOCS_ENV = NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true
docs: $(VENV)/.installed
	$(MKDOCS_ENV) $(VENV)/bin/mkdocs build --strict

serve-docs: $(VENV)/.installed
	$(MKDOCS_ENV) $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000
