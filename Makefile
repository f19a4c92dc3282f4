# The only commands a newcomer needs: make run, make test, make bench, make lint.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# checkov scans the Helm rendering and the Terraform (tests/test_deploy_*.py) from a venv
# of its own: its pinned dependencies would hold the project's dev tools back.
CHECKOV := $(VENV)/checkov/bin/checkov

.PHONY: install run test bench lint clean fuzz

# The tests of the core and the simulator, run a second time on the pure-Python core
PURE_TESTS := tests/test_bucket_laws.py tests/test_batch_equivalence.py tests/test_limiter.py \
	tests/test_limits.py tests/test_rules.py tests/test_shares.py tests/test_reference.py \
	tests/test_guarantees.py tests/test_sim_cases.py tests/test_simulation.py \
	tests/test_recovery_gate.py tests/test_compiled_core.py tests/test_restart_memory.py \
	tests/test_http_compiled.py tests/test_http_dispatch_paths.py tests/test_sync_leading_edge.py \
	tests/test_rate_fast_path.py tests/test_heap.py

install: $(STAMP)

# The decision core is compiled with mypyc (setup.py; the list is src/bucketmesh/_native.py):
# the dev dependencies (mypy among them) first, then the package again without build
# isolation, so that setup.py finds mypyc. Without a compiler it installs the pure core.
CORE_SOURCES := src/bucketmesh/core/bucket.py src/bucketmesh/core/limiter.py src/bucketmesh/_native.py \
	src/bucketmesh/core/heap.c src/bucketmesh/http/server.py src/bucketmesh/http/server.pxd \
	src/bucketmesh/api/hot.py src/bucketmesh/api/hot.pxd

$(STAMP): pyproject.toml setup.py $(CORE_SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>/dev/null || true
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q 'setuptools>=77' wheel
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@$(PY) -c "from bucketmesh import _native; print('bucketmesh: the decision core is', 'compiled (mypyc)' if _native.compiled() else 'pure Python (no compiler: docs/build.md)')"
	@$(PY) -c "from bucketmesh import _native; print('bucketmesh: the HTTP server is', 'compiled (Cython)' if _native.compiled_http() else 'pure Python (no Cython or compiler: docs/build.md)')"
	@test -x $(CHECKOV) || ($(PYTHON) -m venv $(VENV)/checkov && $(VENV)/checkov/bin/pip install -q 'checkov>=3.2,<4')
	@touch $(STAMP)

run: install
	$(VENV)/bin/bucketmesh run

test: install
	@scripts/ensure-debian-packages.sh redis-server prometheus
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -p no:cacheprovider --durations=15
	@# the pure-Python reference core (BUCKETMESH_PURE=1: no compiled module is loaded),
	@# on the core and simulator tests (the full suite above ran the compiled build)
	BUCKETMESH_PURE=1 $(PY) -m pytest -q -p no:cacheprovider $(PURE_TESTS)

bench: install
	@scripts/ensure-debian-packages.sh nginx wrk redis-server prometheus gcc
	$(PY) benchmarks/run_all.py

# Coverage-guided fuzzing (atheris, tests/fuzz/): each target for FUZZ_SECONDS from its seed
# corpus; new inputs land in $(VENV)/fuzz/<target>, a failing input in $(VENV)/fuzz/crash-*.
FUZZ_SECONDS ?= 300
fuzz: install
	@mkdir -p $(VENV)/fuzz/http $(VENV)/fuzz/sync
	$(PY) tests/fuzz/fuzz_http.py -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -artifact_prefix=$(VENV)/fuzz/ $(VENV)/fuzz/http tests/fuzz/corpus/http
	$(PY) tests/fuzz/fuzz_sync.py -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -artifact_prefix=$(VENV)/fuzz/ $(VENV)/fuzz/sync tests/fuzz/corpus/sync

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy --strict src/bucketmesh
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info src/*.so src/bucketmesh/core/*.so
