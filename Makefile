# Two commands for a newcomer: `make demo` and `make test`. Both install into ./.venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.feature-cloud-installed

.PHONY: demo test bench

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

test: $(STAMP)
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing (exit code 5)"; exit 1; fi; \
	exit $$rc

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-only
