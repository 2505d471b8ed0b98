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

# Mesa's software Vulkan driver (lavapipe) 25 or newer, which SAPIEN (simulator backend
# simpler_widowx, rendering on the CPU) needs. Root; Debian 12 takes it from bookworm-backports,
# other Debian/Ubuntu releases from their own archive (checked to be 25 or newer).
MESA_VULKAN_VERSION = dpkg-query -W -f='$${Status} $${Version}' mesa-vulkan-drivers 2>/dev/null \
	| sed -n 's/^install ok installed \(.*\)/\1/p'
sim-vulkan:
	@if $(MESA_VULKAN_VERSION) | grep -Eq '^([0-9]+:)?(2[5-9]|[3-9][0-9])\.'; then \
	  echo "mesa-vulkan-drivers $$($(MESA_VULKAN_VERSION)) already installed"; \
	elif grep -q 'VERSION_CODENAME=bookworm' /etc/os-release; then \
	  echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/bookworm-backports.list && \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvulkan1 && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers; \
	else \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libvulkan1 mesa-vulkan-drivers; \
	fi
	@$(MESA_VULKAN_VERSION) | grep -Eq '^([0-9]+:)?(2[5-9]|[3-9][0-9])\.' || \
	  { echo "sim-vulkan: mesa-vulkan-drivers is older than 25 here; SAPIEN needs 25 or newer" >&2; exit 1; }

demo: venv
	$(PY) -m twinbrain_ros.demo

lint: venv
	$(VENV)/bin/ruff check .

# The suite in two parts: TEST_WORKERS processes in parallel (a test's time goes mostly to
# process start-up, ROS discovery and simulated episodes, not to the CPU), then, alone, the
# tests marked `serial` (they check times and rates). Both parts run; the worse exit code wins
# ("no tests selected" in a part is fine). `make test TESTS=test/test_serving.py` runs one file.
TEST_WORKERS ?= 3
TESTS ?=
test: lint
	@status=0; \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not serial" $(TESTS) \
	  || { code=$$?; [ $$code -eq 5 ] || status=$$code; }; \
	$(PY) -m pytest -m serial $(TESTS) || { code=$$?; [ $$code -eq 5 ] || status=$$code; }; \
	exit $$status

bench: venv
	$(PY) benchmarks/bench_inference.py --size tiny

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
