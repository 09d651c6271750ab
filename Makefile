# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-tools bench proto proto-check lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gpuledger demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# Chromium, promtool, systemd-analyze, Alertmanager, mlflow and focus-validator for the tests that use them
test-tools:
	scripts/test-tools.sh

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Regenerate the committed stubs from proto/ with the pinned grpcio-tools; stale stubs go first.
proto: $(STAMP)
	rm -f gpuledger/v1/*_pb2*.py gpuledger/v1/*_pb2*.pyi gpuledger/kubelet/podresources/v1/*_pb2*.py gpuledger/kubelet/podresources/v1/*_pb2*.pyi
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/gpuledger/v1/*.proto
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/gpuledger/kubelet/podresources/v1/api.proto

# CI: fail when the committed stubs differ from what `make proto` produces.
proto-check: proto
	git diff --exit-code -- gpuledger/v1 gpuledger/kubelet || (echo "generated stubs are stale: run make proto and commit" && exit 1)
	test -z "$$(git status --porcelain -- gpuledger/v1 gpuledger/kubelet)" || (git status --porcelain -- gpuledger/v1 gpuledger/kubelet; echo "untracked generated stubs" && exit 1)

lint: $(STAMP)
	$(VENV)/bin/ruff check gpuledger tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
