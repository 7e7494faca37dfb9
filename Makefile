# jobworker: `make run` starts a server, `make test` runs every check.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CERTS := var/certs
PROTO_SRC := proto/jobworker/v1/jobworker.proto
GEN_DIR := src/jobworker/v1
export GRPC_ENABLE_FORK_SUPPORT := false

.PHONY: build run test lint typecheck proto proto-check pytest bench clean

build: $(STAMP) $(CERTS)/ca.pem

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

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

bench: build
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
