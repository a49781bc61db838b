# nixcas — `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test lint typecheck pytest pytest-unit proto bench bench-import bench-dump bench-startup bench-grpc bench-nar bench-fuse bench-gc bench-chunking bench-bridge bench-bridge-push bench-s3 system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev,all]'
	touch $@ $(VENV)/.installed-run

## run: import examples/ into the embedded default store as a store path, print what to try, then serve it over gRPC and as a Nix binary cache (Ctrl-C stops; BRIDGE_ARGS=--allow-writes opens uploads)
LISTEN ?= 127.0.0.1:8000
BRIDGE_LISTEN ?= 127.0.0.1:9000
BRIDGE_ARGS ?=
run: $(VENV)/.installed-run
	@NIXCAS=$(BIN)/nixcas LISTEN='$(LISTEN)' BRIDGE_LISTEN='$(BRIDGE_LISTEN)' BRIDGE_ARGS='$(BRIDGE_ARGS)' scripts/run.sh

## system-deps: Debian packages the tests need (idempotent)
system-deps:
	@scripts/system-deps.sh test

## test: ruff, mypy --strict, pytest
test: system-deps $(VENV)/.installed-dev lint typecheck pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# Two workers: the suite is mostly one core of CPU (servers, subprocesses); this machine has two.
PYTEST_WORKERS ?= 2
pytest: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS)

## pytest-unit: the quick run: in-process tests only (tests/unit, nothing marked compat)
pytest-unit: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) tests/unit -m "not compat"

## proto: regenerate src/nixcas/_proto from proto/
proto: $(VENV)/.installed-dev
	$(BIN)/python scripts/genproto.py

## bench: every benchmark (results go to .bench-work/*.json; figures in BENCHMARKS.md)
bench: bench-import bench-dump bench-startup bench-grpc bench-nar bench-fuse bench-gc bench-chunking bench-bridge bench-bridge-push bench-s3

## bench-import: nixcas import and castore ingest against nix-store --add, on the generated tree, 20,000 tiny files and a copy of /usr/include (needs nix-bin)
bench-import: $(VENV)/.installed-dev
	@scripts/system-deps.sh bench
	@mkdir -p .bench-work
	for cmd in import ingest; do \
	  $(BIN)/python bench/import_tree.py --command $$cmd --workdir .bench-work --runs 7 --json .bench-work/import-generated-$$cmd.json && \
	  $(BIN)/python bench/import_tree.py --command $$cmd --tree tiny --files 20000 --workdir .bench-work --runs 7 --json .bench-work/import-tiny-$$cmd.json && \
	  $(BIN)/python bench/import_tree.py --command $$cmd --tree copy:/usr/include --workdir .bench-work --runs 7 --json .bench-work/import-usr-include-$$cmd.json || exit 1; \
	done

## bench-dump: nixcas dump-path against nix-store --dump (and the verifying floor), on the same three trees (needs nix-bin)
bench-dump: $(VENV)/.installed-dev
	@scripts/system-deps.sh bench
	@mkdir -p .bench-work
	$(BIN)/python bench/dump_path.py --workdir .bench-work --json .bench-work/dump-generated.json
	$(BIN)/python bench/dump_path.py --tree tiny --workdir .bench-work --json .bench-work/dump-tiny.json
	$(BIN)/python bench/dump_path.py --tree copy:/usr/include --workdir .bench-work --json .bench-work/dump-usr-include.json

## bench-grpc: Put/Read of a 256 MiB blob and a 10,000-directory recursive Get over TCP and a unix socket
bench-grpc: $(VENV)/.installed-dev
	@mkdir -p .bench-work
	$(BIN)/python bench/grpc_throughput.py --json .bench-work/grpc_throughput.json

## bench-nar: NAR render against nix-store --dump, NAR ingest (needs nix-bin)
bench-nar: $(VENV)/.installed-dev
	@scripts/system-deps.sh bench
	$(BIN)/python bench/nar.py --workdir .bench-work/nar --json .bench-work/nar.json

## bench-fuse: 1 GiB sequential read and find+stat of 10,000 files through a mount vs the local disk (needs /dev/fuse)
bench-fuse: $(VENV)/.installed-dev
	@scripts/system-deps.sh bench
	$(BIN)/python bench/fuse.py --workdir .bench-work/fuse --json .bench-work/fuse.json

## bench-chunking: chunked writes, bao outboards, dedup of two tree versions vs casync and borg
bench-chunking: $(VENV)/.installed-dev
	@scripts/system-deps.sh bench
	@mkdir -p .bench-work
	$(BIN)/python bench/chunking.py --workdir .bench-work --json .bench-work/chunking.json

## bench-bridge: nar-bridge NAR and narinfo GETs against nginx serving a `nix copy --to file://` cache (needs nix-bin, nginx-light, wrk)
bench-bridge: $(VENV)/.installed-dev
	@scripts/system-deps.sh bench
	@mkdir -p .bench-work
	$(BIN)/python bench/bridge.py --workdir .bench-work --json .bench-work/bridge.json

## bench-bridge-push: `nix copy --to` the bridge against `--to file://` and an nginx WebDAV (needs nix-bin, nginx-light)
bench-bridge-push: $(VENV)/.installed-dev
	@scripts/system-deps.sh bench
	@mkdir -p .bench-work
	$(BIN)/python bench/bridge_push.py --workdir .bench-work --json .bench-work/bridge-push.json

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache

## bench-gc: nixcas gc (mark + sweep) on 100,000 objects vs nix-store --gc on 100,000 paths (needs nix-bin)
bench-gc: $(VENV)/.installed-dev
	@scripts/system-deps.sh bench
	@mkdir -p .bench-work
	$(BIN)/python bench/gc_sweep.py --workdir .bench-work --json .bench-work/gc.json

## bench-s3: import / re-import / read-back of the foundation tree into SeaweedFS (S3) + PostgreSQL, with request counts
bench-s3: $(VENV)/.installed-dev
	@scripts/system-deps.sh bench
	@mkdir -p .bench-work
	$(BIN)/python bench/s3.py --workdir .bench-work --json .bench-work/s3.json

## bench-startup: start-up of --version, path-info, castore ls / cat against python and nix-store --query / --dump (needs nix-bin)
bench-startup: $(VENV)/.installed-dev
	@scripts/system-deps.sh bench
	@mkdir -p .bench-work
	$(BIN)/python bench/startup.py --json .bench-work/startup.json
