# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SCALE ?= 20000
SIZES ?= 10000,100000
ENGINES ?= oprf,kkrt,openmined
# NET: loopback (default), lan, wan, or a comma list; lan/wan run the services in Linux network
# namespaces joined by a link shaped with tc netem, or by benchmarks.netem's TUN relay where the
# kernel has no netem (needs root; docs/benchmarks.md).
NET ?= loopback
RECORDS ?= 10000000
QUERIES ?= 1280000
WORKERS ?= 2

.PHONY: install demo test lint browser bench bench-national bench-micro accuracy proto clean

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

test: install lint browser
	$(PY) -m pytest -q

# Headless Chromium for the report's browser test (tests/test_report_browser.py): Debian's
# chromium, installed when missing and we are root; otherwise a loud warning, and the test
# skips saying why (under CI=true it fails instead).
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make browser: chromium missing; installing Debian's chromium"; \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium || \
		  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
		    --no-install-recommends chromium; }; }; \
	else \
		echo "************************************************************************"; \
		echo "WARNING: chromium is not installed and this is not root: the report's"; \
		echo "browser test will SKIP. Install it with: sudo apt-get install -y chromium"; \
		echo "************************************************************************"; \
	fi

# OpenMined PSI pins its own protobuf, so benchmarks.scale installs it in .venv-openmined.
# One invocation writes one run file, benchmarks/results/runs/<UTC time>.json, and renders
# latest.md/.png/.json and the README block from it alone (docs/benchmarks.md).
bench: install
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install --quiet 'matplotlib>=3.8,<4'
	$(PY) -m benchmarks.scale --sizes $(SIZES) --engines $(ENGINES) --net $(NET) $(if $(REPEAT),--repeat $(REPEAT))

# The national custodian: RECORDS custodian records in shards, QUERIES requester queries,
# the offline index built on a Dask LocalCluster of WORKERS workers, then one authorization online.
bench-national: install
	$(PY) -m benchmarks.national --records $(RECORDS) --queries $(QUERIES) --workers $(WORKERS)

bench-micro: install
	$(PY) -m pytest benchmarks/ --benchmark-only --benchmark-enable -p no:cacheprovider

# Per-rule and per-rule-set accuracy, with the misidentification estimate beside it, on the
# synthetic scenario with the realistic error model at each of ACCURACY_SIZES (generated once
# into benchmarks/data, not committed; 1300000 = the 1.28M x 1.3M headline scenario) and on
# FEBRL 1-3 (FEBRL 4 is held out), all in one report from one run:
#   make accuracy ACCURACY_SIZES=100000,1300000
ACCURACY_SIZES ?= 100000
ACCURACY_ERRORS ?= realistic
ACCURACY_OUT ?= benchmarks/results/accuracy

accuracy: $(VENV)/.installed-bench
	$(PY) -m benchmarks.accuracy --sizes $(ACCURACY_SIZES) --error-model $(ACCURACY_ERRORS) \
		--febrl 1,2,3 --markdown $(ACCURACY_OUT).md --json $(ACCURACY_OUT).json

clean:
	rm -rf $(VENV) proto/_generated .pytest_cache .ruff_cache
