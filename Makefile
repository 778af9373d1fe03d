# Two entry points: `make demo` (end-to-end demo on real CT) and `make test`.
# Both create a virtual environment in $(VENV) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On these machines `torch==2.13.0` resolves to a local CPU build; GPU users install their own
# torch into the venv first and set TORCH_SPEC= (empty) to keep it.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test lint format demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[sparse,dev,demo]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m ruff check anatomask_components tests benchmarks
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check anatomask_components tests benchmarks
	$(PY) -m ruff format --check anatomask_components tests benchmarks

format: install
	$(PY) -m ruff format anatomask_components tests benchmarks
	$(PY) -m ruff check --fix anatomask_components tests benchmarks

# QUICK=1: under 5 minutes (fewer steps, smaller crops, two fine-tuning runs); DEMO_OUTPUT: where it all goes.
DEMO_OUTPUT ?= demo_output
demo: install
	$(VENV)/bin/anatomask demo --output $(DEMO_OUTPUT) $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO_OUTPUT)
