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

.PHONY: venv demo test lint bench clean sim-vulkan

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Mesa's software Vulkan driver (lavapipe) 25.x, which SAPIEN (simulator backend simpler_widowx)
# renders with on machines without a GPU. Root, Debian 12 (bookworm-backports) or a Debian/Ubuntu
# whose own mesa-vulkan-drivers is 25 or newer; a machine with a GPU driver needs nothing here.
sim-vulkan:
	@if dpkg-query -W -f='$${Version}' mesa-vulkan-drivers 2>/dev/null | grep -Eq '^(2[5-9]|[3-9][0-9])'; then \
	  echo "mesa-vulkan-drivers $$(dpkg-query -W -f='$${Version}' mesa-vulkan-drivers) already installed"; \
	elif grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then \
	  echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list && \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvulkan1 && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers; \
	else \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvulkan1 mesa-vulkan-drivers; \
	fi

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
