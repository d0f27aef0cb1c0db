# natserve developer commands. Everything installs itself into ./.venv on first use.
#   make run    serve examples/exp.py on 127.0.0.1:8000
#   make test   format, lint, type-check, Rust tests, Python unit and integration tests

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: all run test install lint rust-test py-test clean

all: test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Builds the Rust binaries (release) through the package's own build, as a user's
# `pip install ./python-worker` does, plus the test tools.
install: $(VENV)/bin/python
	$(PIP) install --quiet ./python-worker pytest ruff mypy

run: install
	$(PY) examples/exp.py --address 127.0.0.1 --port 8000

lint: install
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	$(VENV)/bin/ruff check python-worker examples tests
	$(VENV)/bin/ruff format --check python-worker examples tests
	$(VENV)/bin/mypy --strict python-worker/natserve

rust-test:
	cargo test --workspace --locked

py-test: install
	$(VENV)/bin/pytest -q tests/unit tests/integration

test: lint rust-test py-test

clean:
	rm -rf $(VENV) target python-worker/build
