# Two entry points on a fresh machine:  `make demo` (main job)  and  `make test` (test suite).
# Each creates .venv, installs what it needs, builds allmem_ops (CUDA too when nvcc is found).
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
CUTLASS_SPEC?= nvidia-cutlass==4.2.0.0
NPROC       := $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS ?= $(NPROC)
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
BUILD_SOURCES := setup.py $(shell find csrc allmem_ops reference -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.py' \) 2>/dev/null)

.PHONY: demo test bench install clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(CUTLASS_SPEC)" -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(BUILD_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps .
	touch $@

install: $(VENV)/.built

demo: $(VENV)/.built
	cd /tmp && $(CURDIR)/$(PY) -m allmem_ops.demo

test: $(VENV)/.built
	$(VENV)/bin/pytest -q -ra tests

bench: $(VENV)/.built
	$(PY) bench/bench_swa_cpu.py && $(PY) bench/bench_ttt_cpu.py && $(PY) bench/bench_model.py

clean:
	rm -rf build $(VENV) *.egg-info
