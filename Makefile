# natserve developer commands. Everything installs itself into ./.venv on first use.
#   make run    serve examples/exp.py on 127.0.0.1:8000
#   make test   format, lint, type-check, Rust tests, Python unit and integration tests,
#               and the docker compose test (skipped without a Docker engine)
#   make bench  natserve against Mosec, Ray Serve and LitServe on loopback (tests/bench/)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: all run test install wheel lint rust-test py-test compose-test fuzz-smoke fuzz clean bench

all: test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The installable wheel (tools/build_wheel.py): both Rust binaries cross-built for glibc
# 2.17 with cargo-zigbuild (zig from PyPI), in dist/natserve-*-py3-none-manylinux_2_17_x86_64.whl.
WHEEL := dist/natserve-*-py3-none-manylinux_2_17_x86_64.whl
wheel: $(VENV)/bin/python
	@test -x $(VENV)/bin/natserve-agent || echo "natserve: building the Rust binaries (release, for glibc 2.17); about 4 minutes the first time on 2 cores, seconds after"
	$(PY) tools/build_wheel.py

# Installs that wheel (what a user installs), plus the test tools: Mosec's mixin libraries
# (the `mosec` extra), prometheus-client (a ported Mosec example) and, where apt works,
# redis-server (the Redis mixin's integration tests) and Debian's prometheus package for
# promtool (the metrics test runs `promtool check metrics` on live scrapes).
install: wheel
	$(PIP) install --quiet --force-reinstall --no-deps $(WHEEL)
	$(PIP) install --quiet "$$(ls $(WHEEL))[mosec]" pytest ruff mypy hypothesis prometheus-client cryptography schemathesis pyyaml
	@command -v redis-server >/dev/null || apt-get install -y -q redis-server >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null 2>&1) \
		|| echo "note: redis-server not installed; the Redis mixin's integration tests skip"
	@command -v promtool >/dev/null || apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1) \
		|| echo "note: promtool not installed (Debian's prometheus package); the promtool metrics test skips"

run: install
	$(PY) examples/exp.py --address 127.0.0.1 --port 8000

lint: install
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	$(PY) tools/check_rust_version.py
	$(VENV)/bin/ruff check python-worker examples tests tools
	$(VENV)/bin/ruff format --check python-worker examples tests tools
	$(VENV)/bin/mypy --strict python-worker/natserve

rust-test:
	cargo test --workspace --locked

py-test: install
	$(VENV)/bin/pytest -q tests/unit tests/integration

# docker-compose.yml end to end (tests/compose): about a minute with its images cached
# (~/.cache/natserve/compose), a few more the first time. Without a reachable Docker
# engine it prints a SKIP line and passes.
compose-test: install
	$(PY) -c 'import yaml' 2>/dev/null || $(PIP) install --quiet pyyaml
	$(VENV)/bin/pytest -q -rs tests/compose

# cargo fuzz on the frame codec and the ingress's HTTP handling (fuzz/), bounded in time.
# Stable Rust, no sanitizer; instrumented builds are cached in ~/.cache/natserve/fuzz
# (several minutes the first time on 2 cores, seconds after).
FUZZ_SECONDS ?= 300
fuzz-smoke: install
	$(PY) tools/fuzz.py --seconds 10

# Longer: FUZZ_SECONDS per target, and the Python decoder's property tests scaled up.
fuzz: install
	$(PY) tools/fuzz.py --seconds $(FUZZ_SECONDS)
	NATSERVE_FUZZ_EXAMPLES=200000 $(VENV)/bin/pytest -q tests/unit/test_protocol_fuzz.py

test: lint rust-test py-test fuzz-smoke compose-test

# natserve vs Mosec 0.9.8, Ray Serve 2.60.0 and LitServe 0.2.19, same worker logic, wrk as
# the load generator (~13 minutes; 2 more the first time). Installs wrk (apt), the floor;
# run.py installs each peer into its own virtualenv (.bench-venv, .bench-ray,
# .bench-litserve) the first time, and leaves out, saying why, one that will not install.
# BENCH_ARGS="--peers mosec" measures against Mosec alone.
BENCH_ARGS ?=
bench: install
	command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	cargo build --release --locked -p natserve-scheduler --example floor
	$(PY) tests/bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) target python-worker/build dist
