# Single entry point: `make test` (set-up + tests), `make demo` (set-up + the main job).
# Set-up is idempotent: the venv is created once, the mmcv wheel is built once into a cache
# outside the repo (keyed by mmcv + torch versions) and installed from there afterwards.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
TORCHVISION_VERSION := 0.28.0
MMCV_VERSION := 2.1.0
CACHE_DIR ?= $(HOME)/.cache/mmeformer
MMCV_WHEEL_DIR := $(CACHE_DIR)/wheels/mmcv-$(MMCV_VERSION)-torch-$(TORCH_VERSION)
STACK_STAMP := $(VENV)/.stack-installed
EDITABLE_STAMP := $(VENV)/.mmeformer-installed
PYTEST_ARGS ?=

.PHONY: setup test demo doctor clean-venv

setup: $(EDITABLE_STAMP)

# torch: '===' skips a local 2.13.0+cpu wheel on which torchvision's ops do not load.
# setuptools < 81: mmcv's setup.py and mmengine's mmdet::/mmseg:: config lookup need pkg_resources.
$(STACK_STAMP): requirements/stack.txt requirements/deploy.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q 'setuptools>=77.0.3,<81' wheel ninja
	$(PY) -m pip install -q 'torch===$(TORCH_VERSION)' 'torchvision==$(TORCHVISION_VERSION)'
	@if ! ls $(MMCV_WHEEL_DIR)/mmcv-$(MMCV_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "Building mmcv $(MMCV_VERSION) with ops against torch $(TORCH_VERSION) (about 17 min on 2 cores, once)"; \
	  tmp=$$(mktemp -d) && \
	  MMCV_WITH_OPS=1 MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip wheel -q --no-deps --no-build-isolation \
	    mmcv==$(MMCV_VERSION) -w $$tmp && \
	  mkdir -p $(MMCV_WHEEL_DIR) && mv $$tmp/mmcv-*.whl $(MMCV_WHEEL_DIR)/ && rm -rf $$tmp; \
	fi
	$(PY) -m pip install -q $(MMCV_WHEEL_DIR)/mmcv-$(MMCV_VERSION)-*.whl
	$(PY) -m pip install -q -r requirements/stack.txt
	$(PY) -m pip install -q -r requirements/deploy.txt
	$(PY) -c "import mmcv.ops, torchvision.ops; print('mmcv ops OK')"
	@touch $@

$(EDITABLE_STAMP): $(STACK_STAMP) setup.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

test: setup
	$(PY) -m pytest tests -q -rs -n 2 --durations=30 $(PYTEST_ARGS)

doctor: setup
	$(PY) -m mmeformer.doctor

demo: setup
	$(PY) tools/demo.py

clean-venv:
	rm -rf $(VENV)
