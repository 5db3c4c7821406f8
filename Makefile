# One entry point for people and CI. Every target sets up what it needs in .venv first.
#   make demo    the main job on the embedded digits data
#   make test    lint + the test suite (CUDA tests skip without a GPU)
#   make bench   the pytest-benchmark comparisons (fused vs eager vs torch.compile)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CUDA-enabled build compiles wherever torch has CUDA and nvcc is found, GPU or not.
export MAX_JOBS ?= 2

.PHONY: setup build demo test lint bench bench-quick cmake-build clean

setup: $(VENV)/.deps
$(VENV)/.deps: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# torchattacks pins an old torch: install it without dependencies (it needs scipy only).
	$(BIN)/python -m pip install -q --no-deps torchattacks==3.5.1
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.deps setup.py tools/build_flags.py $(wildcard csrc/*.* csrc/*/*.*)
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	$(BIN)/python -m adasmooth_ext info
	touch $@

demo: build
	$(BIN)/python -m adasmooth_ext demo

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: build lint
	$(BIN)/python -m pytest tests -q

bench: build
	$(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-columns=median,iqr,ops,rounds \
		--benchmark-sort=name --benchmark-group-by=group

# Each benchmark once, untimed, so that they cannot rot.
bench-quick: build
	$(BIN)/python -m pytest benchmarks -q --benchmark-disable

# The CMake build of the same library, then a smoke test of what it built, in a fresh process.
cmake-build: setup
	cuda=$$($(BIN)/python tools/build_flags.py --cuda-home); \
	cmake -S . -B build/cmake -DPython_EXECUTABLE=$(abspath $(BIN)/python) \
		$${cuda:+-DCUDAToolkit_ROOT=$$cuda} $${cuda:--DADASMOOTH_CUDA=OFF} $(CMAKE_ARGS)
	cmake --build build/cmake -j $(MAX_JOBS)
	$(BIN)/python tools/smoke_cmake_build.py build/cmake/adasmooth_ext

clean:
	rm -rf build *.egg-info adasmooth_ext/*.so
