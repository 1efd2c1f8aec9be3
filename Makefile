# Two commands for a newcomer: `make demo` and `make test`. Both install into ./.venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.feature-cloud-installed
# pytest-xdist workers of `make test` / `make test-core`: CI's two cores (each test process keeps
# one torch thread; `make test TEST_WORKERS=0` runs in one process)
TEST_WORKERS ?= 2

.PHONY: demo test lint test-core test-oldest bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[all]"
	# fastreid 1.4.0 pins torch==1.13.1 (unresolvable on Python 3.11): install it without deps;
	# the fastreid extra above already brought what it needs.
	$(PY) -m pip install -q -c constraints.txt --no-deps fastreid==1.4.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m feature_cloud demo

# the gates of `make test` alone (seconds): ruff, ruff format, mypy
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# while developing: the core modules' tests only (about 3 minutes; `make test` runs everything)
test-core: lint
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) tests/core

# lint (ruff), format check and type check (mypy: strict on feature_cloud/) run before the tests
test: lint
	@$(PY) -m pytest -q -n $(TEST_WORKERS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing (exit code 5)"; exit 1; fi; \
	exit $$rc

# The oldest releases pyproject.toml allows, in .venv-oldest (not part of `make test`: a ~3 GB
# torch): Python 3.9, torch 2.2.2 (with numpy 1.x, which that torch needs) and
# pytorch-metric-learning 2.0.0; the core, the demo / evaluate tools and the PML adapter. Not the
# timm adapter (timm >= 1.0.31 needs Python >= 3.10) nor fastreid's (its own pinned stack).
OLDEST_PYTHON ?= python3.9
test-oldest:
	test -x .venv-oldest/bin/python || $(OLDEST_PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q "torch==2.2.2" "numpy<2" "pytorch-metric-learning==2.0.0" \
		pytest hypothesis scikit-learn matplotlib tqdm Pillow faiss-cpu
	.venv-oldest/bin/python -m pip install -q --no-deps -e .
	.venv-oldest/bin/python -m pytest -q -p no:cacheprovider tests/core tests/demo \
		tests/integrations/test_integration_pml.py tests/integrations/test_pml_dtype.py \
		tests/integrations/test_pml_distributed.py

# Not one of the two newcomer commands: the full benchmark suite, its ratio table and plot
# (benchmarks/README.md, benchmarks/ratios.png). `make test` runs only a smoke subset.
bench: $(STAMP)
	FC_BENCH_THREADS=1 $(PY) -m pytest benchmarks -q --benchmark-only --benchmark-json=benchmarks/results/bench.json
	FC_BENCH_THREADS=1 $(PY) -m benchmarks.interleaved --reps 21 --out benchmarks/results/interleaved_1thread.json
	$(PY) -m benchmarks.suite --reps 5 --out benchmarks/results/suite.json
	$(PY) -m benchmarks.peak_memory --configs fused,fused_cloud,chunked,chunked_cloud,reference,floor,pml,pml_leap --classes 100000 --threads 1 --cap-gib 6 --out benchmarks/results/memory.json
	$(PY) -m benchmarks.report --bench benchmarks/results/bench.json --interleaved benchmarks/results/interleaved_1thread.json --memory benchmarks/results/memory.json --suite benchmarks/results/suite.json benchmarks/results/suite_full_both_threads.json --readme benchmarks/README.md --main-readme README.md --png benchmarks/ratios.png
