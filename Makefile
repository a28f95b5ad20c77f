# Build the virtual environment once (again when setup.cfg changes), then
# run the demo or the tests. Python 3.11 is preferred, python3 otherwise.

PYTHON := $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test

demo: $(STAMP)
	$(VENV)/bin/keras-csgd demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -e '.[test]'
	touch $@
