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

demo: install
	$(PY) -m agency_a.demo --scale $(SCALE)

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q

# OpenMined PSI pins its own protobuf, so benchmarks.scale installs it in .venv-openmined.
bench: install
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install --quiet 'matplotlib>=3.8,<4'
	$(PY) -m benchmarks.scale --sizes $(SIZES) --engines $(ENGINES) $(if $(REPEAT),--repeat $(REPEAT))

bench-micro: install
	$(PY) -m pytest benchmarks/ --benchmark-only --benchmark-enable -p no:cacheprovider

accuracy: $(VENV)/.installed-bench
	$(PY) -m benchmarks.accuracy_run --queries 1280000 --records 1300000

clean:
	rm -rf $(VENV) proto/_generated .pytest_cache .ruff_cache
