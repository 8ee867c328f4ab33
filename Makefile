# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SCALE ?= 20000
SIZES ?= 10000,100000
ENGINES ?= oprf,openmined

.PHONY: install demo test lint bench bench-micro accuracy proto clean

$(VENV)/.installed-dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m proto
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

install: $(VENV)/.installed-dev

proto: install
	$(PY) -m proto

# KEEP=1 keeps the demo's working directory (keys, ledgers, logs) and prints where it all is.
demo: install
	$(PY) -m agency_a.demo --scale $(SCALE) $(if $(KEEP),--keep)

# Style, then the layers (import-linter contracts in pyproject.toml), then types (mypy).
lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

test: install lint
	$(PY) -m pytest -q

# OpenMined PSI pins its own protobuf, so benchmarks.scale installs it in .venv-openmined.
bench: install
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install --quiet 'matplotlib>=3.8,<4'
	$(PY) -m benchmarks.scale --sizes $(SIZES) --engines $(ENGINES) $(if $(REPEAT),--repeat $(REPEAT))

bench-micro: install
	$(PY) -m pytest benchmarks/ --benchmark-only --benchmark-enable -p no:cacheprovider

# Per-rule accuracy on the headline scenario (generated into benchmarks/data, not committed).
ACCURACY_QUERIES ?= 1280000
ACCURACY_RECORDS ?= 1300000
ACCURACY_SCENARIO ?= benchmarks/data/scenario-$(ACCURACY_QUERIES)x$(ACCURACY_RECORDS)
ACCURACY_OUT ?= benchmarks/results/accuracy

accuracy: $(VENV)/.installed-bench
	$(PY) -m protocol.adapters.scenario --queries $(ACCURACY_QUERIES) \
		--records $(ACCURACY_RECORDS) --out $(ACCURACY_SCENARIO)
	$(PY) -m benchmarks.accuracy $(ACCURACY_SCENARIO) \
		--markdown $(ACCURACY_OUT).md --json $(ACCURACY_OUT).json

clean:
	rm -rf $(VENV) proto/_generated .pytest_cache .ruff_cache
