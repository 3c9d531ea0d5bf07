# DimezblNet companion. Two commands do everything on a fresh machine:
#   make reproduce   (PROFILE=smoke|cpu|paper, default smoke)
#   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
PROFILE ?= smoke
STAMP := $(VENV)/.installed
DIMEZBL := $(VENV)/bin/dimezbl

.PHONY: setup test lint reproduce lab clean md17-data benchmark shortrange fair fair-report fair-shortrange

setup: $(STAMP)

# torch first and pinned (the CPU wheel on this disk), then the package itself (editable) with its dependencies
# and the development tools (pytest, ruff, jupyterlab); a torch range would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name dimezbl --display-name "DimezblNet (.venv)" >/dev/null
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# ruff's lint and format checks (configured in pyproject.toml); .ci/run runs them before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# smoke results go to results/, other profiles to results/<profile>/ (so they never overwrite
# each other); ARGS passes more options, e.g. ARGS="--set 'targets=[\"U0\"]'"
RESULTS_DIR ?= $(if $(filter smoke,$(PROFILE)),results,results/$(PROFILE))
ARGS ?=
reproduce: $(STAMP)
	$(DIMEZBL) reproduce --profile $(PROFILE) --results-dir $(RESULTS_DIR) $(ARGS)

# MD17-style data for the cpu/paper profiles: GFN2-xTB (tblite) Langevin MD at 500 K,
# N_CONFIGS configurations per molecule; shows progress and resumes where it stopped.
N_CONFIGS ?= 2000
md17-data: $(STAMP)
	$(DIMEZBL) generate-md17 --all --n-configs $(N_CONFIGS)

# The short-range experiment with the MD17 models of `make reproduce` (same PROFILE): bond compression
# against GFN2-xTB and MD stability (Langevin and NVE, 500/1000/1500 K); smoke: about 10 min on 2 cores.
# Tables in $(RESULTS_DIR)/shortrange/, figures in $(RESULTS_DIR)/figures/shortrange_*.png.
SHORTRANGE_ARGS ?=
shortrange: $(STAMP)
	$(DIMEZBL) shortrange --profile $(PROFILE) --results-dir $(RESULTS_DIR) $(SHORTRANGE_ARGS)

# The fair test of the ZBL claim (docs/fair.md): DimeNet against three ZBL recipes, 4 seeds, QM9 and MD17 cells;
# about 12 hours on 2 cores, resumable (rerun to continue), finished runs reused. fair-report rebuilds
# results/fair/tables and results/fair/figures from the finished runs without training.
fair: $(STAMP)
	$(DIMEZBL) fair train

fair-report: $(STAMP)
	$(DIMEZBL) fair report

# Compression curves and MD stability of the fair models of one molecule (MOLECULE=malonaldehyde|ethanol;
# training seed 0; their checkpoints or shipped potentials).
MOLECULE ?= malonaldehyde
fair-shortrange: $(STAMP)
	$(DIMEZBL) fair shortrange --molecule $(MOLECULE)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ tests/__pycache__

benchmark: $(STAMP)
	set -o pipefail; $(PY) -m bench.bench_dimenet --json results/benchmark/bench_dimenet.json --history results/benchmark/history.csv 2>&1 | tee results/benchmark/bench_dimenet.log
