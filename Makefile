# otel-ebpf: `make demo` and `make test` on a fresh Debian 12 machine, as root.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test unit integration bench clean

setup:
	@sh scripts/setup.sh

demo: setup
	$(VENV)/bin/otel-ebpf demo

test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS) tests

unit: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS) tests/unit

integration: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS) tests/integration

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
