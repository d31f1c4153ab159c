# The two commands of the README. Both create the environment (.venv, Python 3.12) when it is missing.
PYTHON ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9

.PHONY: demo test test-slow test-all lint bench env lock clean-env check-install gpu-wheels gpu-pass gpu-pass-dry-run

demo: $(VENV)/.installed
	$(VENV)/bin/ggnd demo

# One pytest process per test file: the hosts change process-wide state (e3nn's scripting defaults,
# TorchScript caches), and MACE models built after NequIP training in the same process could not be
# pickled. Any failing file, or one that runs no test (pytest's exit 5), fails the target.
# `make test` (the README's command, run by CI) leaves out the tests marked slow: compiling models with
# inductor / AOTInductor (nequip-compile), the hosts' own training CLIs end to end (`ggnd demo --quick`
# among them), long MD. They take about as long again; `make test-slow` runs them (before a release, and
# after touching block_compile, an adapter's compile or fit path, or the stability runner). `make test-all`
# runs both.
# A file whose tests are all slow says so once (`pytestmark = pytest.mark.slow`); `make test` leaves it
# out rather than run it to select nothing.
TEST_FILES := $(wildcard tests/test_*.py)
ALL_SLOW_TEST_FILES = $(shell grep -l "^pytestmark = pytest.mark.slow" tests/test_*.py)
SLOW_TEST_FILES = $(shell grep -l "mark.slow" tests/test_*.py)

define run_pytest_per_file
	@failed=""; for file in $(1); do \
	  echo "== $$file"; $(PY) -m pytest $$file -m "$(2)" || failed="$$failed $$file"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi; echo "all test files passed ($(2))"
endef

test: $(VENV)/.installed
	$(PY) -m ruff check ggnd_plugin tests benchmarks examples
	$(call run_pytest_per_file,$(filter-out $(ALL_SLOW_TEST_FILES),$(TEST_FILES)),not slow)

test-slow: $(VENV)/.installed
	$(call run_pytest_per_file,$(SLOW_TEST_FILES),slow)

test-all: test test-slow

# Every install route of the README (base, each extra, all hosts) from a wheel and sdist built from this
# checkout, each in a fresh venv made with uv (.ci/check_install.py; --resolve fresh to resolve against
# the registry instead of requirements.lock). Table on stdout, record in build/check-install.json.
check-install: $(VENV)/.installed
	$(PY) .ci/check_install.py $(CHECK_INSTALL_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check ggnd_plugin tests benchmarks examples

# Re-measures and replaces the committed result (benchmarks refuse to overwrite without --overwrite).
bench: $(VENV)/.installed
	$(PY) benchmarks/block_scaling.py --overwrite

# The GPU pass (benchmarks/gpu_pass.py; docs/scale.md, "The GPU pass"): correctness, batched stability,
# table 5, the block alone and nccl on one GPU, within 8 minutes from the first line of the recipe (the
# pass stops itself at 450 s; `timeout` is the last resort). The lent GPU machines have no network and
# their own python3 with a CUDA torch: `make gpu-wheels` (here, with network) puts the wheels that image
# lacks in $(GPU_WHEELS); carry that folder with the device call, and `make gpu-pass` there installs them
# into $(GPU_SITE) (nothing, where the environment already has everything), then runs the pass: the
# CUDA tests first, then the measurements. Results: $(GPU_PASS_OUT) and its .md, copied into $$OUT
# where that is set (the device tool's output folder; a rerun there replaces the first run's JSON).
# Elsewhere, replacing a committed result needs GPU_PASS_ARGS=--overwrite. The CPU dry run of the same script is part of `make test`
# (tests/test_gpu_pass.py); `make gpu-pass-dry-run` runs it alone.
GPU_PYTHON ?= python3
GPU_WHEELS := .gpu-wheels
GPU_SITE ?= /tmp/ggnd-gpu-site
GPU_PASS_OUT ?= benchmarks/results/gpu_pass.json
GPU_PASS_ARGS ?=

gpu-wheels: $(VENV)/.installed
	$(PY) benchmarks/gpu_env.py wheels --into $(GPU_WHEELS)

gpu-pass:
	@export GGND_GPU_PASS_T0=$$(date +%s) GGND_GPU_SITE=$(GPU_SITE); \
	timeout --signal=TERM --kill-after=5 472 sh -c '\
	  $(GPU_PYTHON) benchmarks/gpu_env.py install --wheels $(GPU_WHEELS) --site $(GPU_SITE) && \
	  PYTHONPATH=$(CURDIR):$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 \
	  $(GPU_PYTHON) benchmarks/gpu_pass.py --device cuda --out $(GPU_PASS_OUT) $${OUT:+--overwrite} $(GPU_PASS_ARGS)'; \
	status=$$?; \
	if [ -n "$$OUT" ] && [ -d "$$OUT" ]; then cp -f $(GPU_PASS_OUT) $(basename $(GPU_PASS_OUT)).md "$$OUT"/; fi; \
	echo "gpu-pass: exit $$status after $$(( $$(date +%s) - GGND_GPU_PASS_T0 )) s"; exit $$status

gpu-pass-dry-run: $(VENV)/.installed
	$(PY) benchmarks/gpu_pass.py --device cpu --tiny --overwrite

env: $(VENV)/.installed

# One environment with all three hosts: pinned by requirements.lock, installed without re-resolving.
# ggnd_plugin/__init__.py holds the version, which the editable install's metadata records.
$(VENV)/.installed: requirements.lock pyproject.toml ggnd_plugin/__init__.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(PY) -m uv pip install --python $(PY) --no-deps -r requirements.lock
	$(PY) -m uv pip install --python $(PY) --no-deps -e .
	touch $@

# Regenerate the lock after changing dependencies. The e3nn override is the one `ggnd env overrides`
# prints for users (all hosts in one environment); overrides.txt pins torch for the lock.
lock:
	$(PYTHON) -m uv pip compile pyproject.toml --all-extras \
	  --override ggnd_plugin/configs/all_hosts_overrides.txt --override overrides.txt \
	  --python-version 3.12 --no-emit-index-url --no-annotate --no-header -o requirements.lock

clean-env:
	rm -rf $(VENV)
