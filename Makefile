# make test  : set up a fresh machine, build the extension (CUDA sources compiled too when
#              nvcc is found, as a compile check on machines without a GPU), build the CMake
#              twin (CPU sources only: pip's build already compiled the CUDA ones), run the tests.
# make bench : the same set-up, then the benchmarks on the best device present (on the CPU with
#              1 thread, as the README's table was measured: BENCH_ARGS="--threads 2" for more).
# make gpu-check : on a GPU machine, in under 9 minutes: build for that GPU, CUDA tests, memcheck,
#              the headline benchmarks and a summary against the issues' targets, all under
#              benchmarks/results/<device>/ (benchmarks/gpu_check.py; GPU_CHECK_ARGS=--plan lists it,
#              --rehearse times here what needs no GPU against the budgets, --only bench reruns a phase).
PYTHON ?= python3
VENV ?= .venv
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

# Use the torch already importable where there is one (a GPU machine); otherwise a venv
# with the pinned CUDA build of torch (pip takes it from local disk here).
ifeq ($(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo yes),yes)
PY := $(PYTHON)
SETUP_DEPS :=
else
PY := $(abspath $(VENV))/bin/python
SETUP_DEPS := $(VENV)/.ready
export PATH := $(abspath $(VENV))/bin:$(PATH)
endif
ifneq ($(wildcard $(CUDA_HOME)/bin/nvcc),)
export FORCE_CUDA := 1
endif

.PHONY: setup build cmake test bench gpu-check clean

$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 timm ninja pytest numpy matplotlib tqdm scikit-learn \
		onnx onnxscript onnxruntime
	touch $@

# Where torch came with the machine, add what the tests and benchmarks need beside it.
# onnx, onnxscript, onnxruntime (the ONNX export tests) where pip can get them: offline, those tests skip.
setup: $(SETUP_DEPS)
	@$(PY) -c "import timm, pytest, triton, matplotlib, tqdm, sklearn" 2>/dev/null || \
		$(PY) -m pip install -q timm pytest triton matplotlib tqdm scikit-learn
	@$(PY) -c "import onnx, onnxscript, onnxruntime" 2>/dev/null || \
		$(PY) -m pip install -q onnx onnxscript onnxruntime || echo "onnx/onnxruntime not installed: ONNX tests skip"

build: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# The CMake twin of the extension; skipped (and its test with it) where cmake is missing.
# CPU-only: the CUDA sources are compiled once per make test, by the pip build above
# (`cmake -S . -B build-cmake -DSPARSE_OPS_CUDA=ON` builds them with CMake by hand).
ifneq ($(shell command -v cmake),)
CMAKE_LIB := $(abspath build-cmake/_C.so)
cmake: setup
	cmake -S . -B build-cmake $(if $(shell command -v ninja),-G Ninja) -DPython_EXECUTABLE=$(PY) \
		-DSPARSE_OPS_CUDA=OFF
	cmake --build build-cmake
else
cmake:
	@echo "cmake not found: skipping the CMake build"
endif

test: build cmake
	SPARSE_OPS_REQUIRE_EXT=1 SPARSE_OPS_REQUIRE_CUDA=$(FORCE_CUDA) SPARSE_OPS_CMAKE_LIB=$(CMAKE_LIB) \
		$(PY) -m pytest -q tests

# make bench BENCH_ARGS="--suite attention --case varlen": any `python -m benchmarks` options.
# The harness sets the thread count itself (--threads, default 1 on the CPU) and records it.
bench: build
	$(PY) -m benchmarks $(BENCH_ARGS)

# No set-up step: it builds the extension itself, for the GPU it finds, into the torch present,
# offline (the GPU machine has no network: pip's index and the HF hub are switched off).
gpu-check:
	$(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build build-cmake dist *.egg-info sparse_ops/*.so sparse_ops/_build_info.py
