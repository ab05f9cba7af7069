# The commands people type. `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# torch guesses CUDA_HOME from `which nvcc`; the toolkit lives here on our machines.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

# Small enough for a CPU in a few minutes; on a GPU try DEMO_TRAIN="--epochs 5 --lr 0.01 --amp bf16 --channels-last".
DEMO_TRAIN ?= --limit 512 --epochs 3 --input-size 112 --batch-size 32 --lr 0.01

.PHONY: install test demo bench bench-gpu sanitize clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q setuptools wheel ninja

# Builds alexnet_fast._C (CUDA kernels too when nvcc is found) and installs the package editable.
$(VENV)/.installed: $(PY) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The pytest-benchmark suites run once each, untimed, so they cannot rot unnoticed.
test: install
	$(PY) -m pytest tests -q
	$(PY) -m pytest benchmarks -q --benchmark-disable

demo: install
	$(VENV)/bin/alexnet-fast info
	$(VENV)/bin/alexnet-fast bench --quick --out runs/bench
	$(VENV)/bin/alexnet-fast train --data synthetic --backend auto $(DEMO_TRAIN) --out runs/demo --overwrite
	@echo; echo "Our backends against eager PyTorch and the other peers on this machine (runs/bench):"
	$(VENV)/bin/alexnet-fast bench --markdown --out runs/bench

bench: install
	$(VENV)/bin/alexnet-fast bench --ops --train-step --out benchmarks/results

# On a machine with an NVIDIA GPU and torch already installed: build, GPU tests, sanitizers, benchmarks.
bench-gpu:
	bash scripts/gpu.sh

sanitize:
	bash scripts/sanitize.sh

clean:
	rm -rf build $(VENV)/.installed alexnet_fast/*.so
