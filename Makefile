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

$(VENV)/.installed: pyproject.toml setup.py MANIFEST.in dolfinx_mno_mpi.pth scripts/find_python.sh
	@python=$$(./scripts/find_python.sh) || exit 1; \
	echo "using $$python ($$($$python --version))"; \
	[ -x $(PY) ] || $$python -m venv $(VENV) || exit 1
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dolfinx,operators,mesh,plot,test,dev]"
	@# dolfinx-external-operator names fenics-dolfinx, which the wheel does not provide.
	$(PY) -m pip install -q --no-deps "dolfinx-external-operator>=0.11,<0.12"
	@# dolfinx-adjoint (pyadjoint for DOLFINx), for benchmarks/adjoint_routes.py and its test;
	@# it names fenics-dolfinx too. pyadjoint's own needs, scipy and sympy, are installed.
	$(PY) -m pip install -q --no-deps "dolfinx-adjoint>=0.4,<0.5" "fenicsx-compat>=0.4,<0.5" \
		"pyadjoint-ad>=2026.10" "checkpoint-schedules>=1.0"
	@# dolfinx before dolfinx_mno: the start-up hook (dolfinx_mno_mpi.pth) must make it work.
	$(PY) -c "import dolfinx, dolfinx_mno, torch, dolfinx_adjoint; print('dolfinx', dolfinx.__version__, 'torch', torch.__version__)"
	@touch $@

venv: $(VENV)/.installed

demo: venv
	cd demos && ../$(PY) quickstart.py

# More ranks than cores (3 on a 2-core machine): MPICH polls for progress without pause, so
# a rank waiting in a collective spins through its time slice while the rank it waits for
# is descheduled. The throttle sleeps 1 us after 256 polls without progress: the 3-rank
# suite runs 2-3x faster, 2 ranks on 2 cores are unchanged (docs/pitfalls.md).
test-serial test-mpi: export MPIR_CVAR_CH4_PROGRESS_THROTTLE := 1
test-serial test-mpi: export MPIR_CVAR_CH4_PROGRESS_THROTTLE_NO_PROGRESS_COUNT := 256

# The serial suite runs on one pytest-xdist worker per core, each torch on one thread; a
# file's tests stay on one worker (`--dist loadfile`), a demo's serial and 2-rank runs too
# (they share its output folder); the longest files go first (tests/conftest.py).
TEST_WORKERS ?= auto
test-serial: export OMP_NUM_THREADS := 1

test-serial: venv
	$(PY) -m pytest $(PYTEST_FLAGS) -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-mpi: venv
	timeout $(MPI_TIMEOUT) $(MPIRUN) -n 2 $(PY) -m pytest $(PYTEST_FLAGS) -m mpi tests
	timeout $(MPI_TIMEOUT) $(MPIRUN) -n 3 $(PY) -m pytest $(PYTEST_FLAGS) -m mpi tests

test: lint typecheck test-serial test-mpi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check dolfinx_mno tests demos benchmarks experiments _dolfinx_mno_mpi.py setup.py

typecheck: venv
	$(VENV)/bin/mypy

benchmark: venv
	$(PY) benchmarks/closure_overhead.py --compare-ranks

clean:
	rm -rf $(VENV) build *.egg-info demos/output benchmarks/results experiments/output
