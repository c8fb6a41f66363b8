# Two entry points: `make run` (the whole pipeline on its embedded default) and `make test`.
# Both bootstrap everything from a bare Python 3.11+: a pinned uv in .tools/, then the locked
# environment in .venv/ (torch's CUDA build, which also runs on CPU; see README).

PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
VENV := .venv
STAMP := $(VENV)/.synced-stamp

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PYTHONUNBUFFERED := 1
# Idle OpenMP threads sleep rather than spin (see polysemantic_disentangle/__init__.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup run test bench gpu-check clean chromium

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Bytecode compiled at install: without it, a process whose environment sets
# PYTHONDONTWRITEBYTECODE (common in containers) compiles torch, Prefect, xarray... from source
# at every start, about 6 of the 16 CPU seconds that importing the pipeline took on 2 cores.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode
	touch $@

setup: $(STAMP)

run: setup
	$(VENV)/bin/disentangle run $(ARGS)

# The HTML tests render reports in headless Chromium; CI machines get it from Debian's
# package (root, or sudo without a password), and CI=true fails instead of skipping without it.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "chromium not found: installing the Debian package"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

# Test files run side by side, one worker per core up to four (each worker keeps its own
# Prefect test server; four bounds memory at about 4 GB per worker's end-to-end runs). A file
# stays on one worker, so its module fixtures (a baseline run the kill tests share) run once.
# TEST_WORKERS=0 runs in this process (for --pdb and the like).
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(max(1, min(4, os.cpu_count() or 1)))')

test: setup chromium
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python benchmarks/run_all.py

# On a CUDA machine, within 8 minutes on one H100: ResNet-50 all-layer extraction against the
# floor (fp32, bf16 autocast, channels-last, peak GPU memory), the decode feed, a whole
# `disentangle run` on the GPU with every stage's time, and bf16's detection sets against fp32.
# Refuses (exit 2) without CUDA.
gpu-check: setup
	$(VENV)/bin/python benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf .tools $(VENV) .prefect runs
