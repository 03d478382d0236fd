# dolfinx_mno: set-up, demo and tests from a fresh machine.
#   make demo   creates .venv (Python >= 3.12 from PATH or `pyenv root`), installs, runs the quickstart
#   make test   same set-up, then the serial suite, the MPI suite on 2 and 3 ranks, and the demos
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MPIRUN := $(VENV)/bin/mpirun
# A failing rank must not leave the others waiting forever in a collective.
MPI_TIMEOUT ?= 1200
PYTEST_FLAGS ?= -q -p no:cacheprovider

.PHONY: all venv demo test test-serial test-mpi lint typecheck benchmark clean

all: test

$(VENV)/.installed: pyproject.toml scripts/find_python.sh
	@python=$$(./scripts/find_python.sh) || exit 1; \
	echo "using $$python ($$($$python --version))"; \
	[ -x $(PY) ] || $$python -m venv $(VENV) || exit 1
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dolfinx,operators,mesh,plot,test,dev]"
	@# dolfinx-external-operator names fenics-dolfinx, which the wheel does not provide.
	$(PY) -m pip install -q --no-deps "dolfinx-external-operator>=0.11,<0.12"
	$(PY) -c "import dolfinx_mno, dolfinx, torch; print('dolfinx', dolfinx.__version__, 'torch', torch.__version__)"
	@touch $@

venv: $(VENV)/.installed

demo: venv
	cd demos && ../$(PY) quickstart.py

test-serial: venv
	$(PY) -m pytest $(PYTEST_FLAGS) tests

test-mpi: venv
	timeout $(MPI_TIMEOUT) $(MPIRUN) -n 2 $(PY) -m pytest $(PYTEST_FLAGS) -m mpi tests
	timeout $(MPI_TIMEOUT) $(MPIRUN) -n 3 $(PY) -m pytest $(PYTEST_FLAGS) -m mpi tests

test: lint typecheck test-serial test-mpi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check dolfinx_mno tests demos benchmarks experiments

typecheck: venv
	$(VENV)/bin/mypy

benchmark: venv
	$(PY) benchmarks/closure_overhead.py --compare-ranks

clean:
	rm -rf $(VENV) build *.egg-info demos/output benchmarks/results
