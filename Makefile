# One-command setup, demo and tests. Everything installs into .venv from the package registries.
PYTHON ?= python3
VENV ?= .venv
# CPU torch here; on a CUDA machine use e.g. `make TORCH_SPEC=torch==2.13.0 TORCH_PIP_ARGS=...`.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

# ROS 2 wheels need the venv in the ament index; logs and discovery stay local.
export AMENT_PREFIX_PATH := $(abspath $(VENV))
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
# Simulator cameras render offscreen (no display needed).
export MUJOCO_GL ?= egl

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: venv
	$(PY) -m twinbrain_ros.demo

lint: venv
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/bench_inference.py --size tiny

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
