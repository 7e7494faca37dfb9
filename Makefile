# jobworker: `make run` starts a server, `make test` runs every check.
# The first Python 3.11+ found (each candidate is run: a pyenv shim may exist yet fail).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && \
	{ echo $$p; break; }; done)
LOCK := requirements.lock
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CERTS := var/certs
EXEC_HELPER := $(VENV)/libexec/jobworker/jobworker-exec
PROTO_SRC := proto/jobworker/v1/jobworker.proto
GEN_DIR := src/jobworker/v1
export GRPC_ENABLE_FORK_SUPPORT := false

.PHONY: build lock run test lint typecheck proto proto-check pytest bench bench-peers clean

build: $(STAMP) $(EXEC_HELPER) $(CERTS)/ca.pem

# Exact versions from the lock file (reproducible builds); the project itself on top,
# with its extras: dev and ray (the Ray executor's tests need a real cluster).
$(STAMP): pyproject.toml $(LOCK)
	@test -n "$(PYTHON)" || { echo "need Python 3.11 or newer on PATH" \
		"(python3.13, python3.12, python3.11 or python3)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(BIN)/pip install --quiet --disable-pip-version-check -r $(LOCK)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e '.[dev,ray]'
	touch $@

# Remakes the lock file from pyproject.toml's ranges, in a clean throw-away venv.
lock:
	@test -n "$(PYTHON)" || { echo "need Python 3.11 or newer on PATH" >&2; exit 1; }
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --disable-pip-version-check '.[dev,ray]'
	{ echo "# pip install -r requirements.lock: exact versions for make build (make lock)"; \
	  .lock-venv/bin/pip freeze --exclude-editable --disable-pip-version-check | \
	  grep -v '^jobworker[= @]'; } > $(LOCK)
	rm -rf .lock-venv

# The small static program that drops a job to its user in one exec (engine/exec_helper.py).
# Without a C compiler the server still runs (through setpriv and env(1), slower): a warning.
$(EXEC_HELPER): src/jobworker/engine/jobworker-exec.c | $(STAMP)
	$(BIN)/python -m jobworker.engine.exec_helper $@ || \
		echo "warning: jobworker-exec not built; jobs as other users start slower" >&2

# Certificates are made once and never overwritten.
$(CERTS)/ca.pem: | $(STAMP)
	$(BIN)/jobworker certs init --dir $(CERTS)

run: build
	$(BIN)/jobworker serve --config config/jobworker.toml

test: build lint typecheck proto-check pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy src

# Regenerates the committed Python code from the project's copy of the contract.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=src --pyi_out=src \
		--grpc_python_out=src $(PROTO_SRC)

# Fails when the committed generated code differs from what protoc makes now.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=$$tmp --pyi_out=$$tmp \
		--grpc_python_out=$$tmp $(PROTO_SRC) && \
	for f in jobworker_pb2.py jobworker_pb2.pyi jobworker_pb2_grpc.py; do \
		cmp -s $$tmp/jobworker/v1/$$f $(GEN_DIR)/$$f || { \
			echo "generated code drifted: $(GEN_DIR)/$$f (run make proto)" >&2; exit 1; }; \
	done && echo "proto: generated code matches $(PROTO_SRC)"

pytest: build
	$(BIN)/pytest $(PYTEST_ARGS)

bench: build bench-peers
	$(BIN)/python -m bench $(BENCH_ARGS)

# The peers the bench runs beside jobworker (docs/benchmarks.md): task-spooler (Debian
# names its client tsp) and GNU parallel, installed when missing. If they cannot be, the
# bench still runs, and says which peer it could not run and why.
bench-peers:
	@if command -v tsp >/dev/null && parallel --version 2>/dev/null | grep -q 'GNU parallel'; \
	then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "bench-peers: cannot install task-spooler and parallel here" \
			"(needs root and apt-get); the bench runs without them" >&2; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q task-spooler parallel >/dev/null || \
	{ apt-get update -q >/dev/null && apt-get install -y -q task-spooler parallel >/dev/null; } || \
	echo "bench-peers: apt-get could not install task-spooler and parallel;" \
		"the bench runs without them" >&2

clean:
	rm -rf $(VENV) .lock-venv build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
