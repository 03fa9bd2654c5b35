# Two set-up commands matter: `make demo` and `make test`. Both create the environment first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# The seed box's stack (constraints-seed.txt: torch 2.5.1, diffusers 0.35.1 ...) in a second environment,
# where the service and engine tests run too: the oldest versions pyproject.toml accepts are tested ones.
SEED_PY    := .venv-seed/bin/python
SEED_STAMP := .venv-seed/.installed
SEED_TESTS := tests/service/test_builders.py tests/service/test_accel.py tests/service/test_saved_compile.py \
	tests/service/test_quality_options.py tests/service/test_embeddings.py tests/service/test_coalescing.py \
	tests/service/test_api.py tests/service/test_runtime.py tests/service/test_hub_mirror.py
# the whole deploy flow is the control side's: it runs in the main environment
SEED_SKIP  := --deselect tests/service/test_hub_mirror.py::test_deploy_flow_serves_sdxl_from_the_mirror
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export HF_HUB_OFFLINE ?= 1
export SDXL_DEPLOY_CACHE ?= $(CURDIR)/.cache/models
# pytest-xdist processes: many tests wait on services they started, so three keep 2 cores busy; a module's
# tests stay in one process (module-scoped engines and servers are built once), in the order tests/conftest.py
# puts them (the longest modules first). The 30 slowest tests are listed at the end: where the time goes.
TEST_WORKERS ?= 3
# Python compiles each module the first time it is imported; compiling all of torch's at install is minutes of
# a 2-core machine for files no test imports.
PIP_FAST   := --no-compile
PYTEST     := -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=30

.PHONY: setup setup-seed demo test test-seed coverage lint ui clean system-deps

setup: $(STAMP)
	@mkdir -p "$(PREFECT_HOME)" "$(SDXL_DEPLOY_CACHE)"

$(STAMP): pyproject.toml constraints.txt service/requirements.txt
	@$(MAKE) --no-print-directory system-deps
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_FAST) -c constraints.txt torch torchvision
	$(PY) -m pip install -q $(PIP_FAST) -c constraints.txt -c service/requirements.txt -e '.[test]'
	touch $(STAMP)

setup-seed: $(SEED_STAMP)

# PyPI's Linux torch 2.5.1 is the CUDA 12.4 build: `import torch` needs its nvidia-* libraries even on a CPU
# (checked: without them it fails on libcudart.so.12), so they come along (~2.9 GB, pip's cache keeps them).
$(SEED_STAMP): pyproject.toml constraints-seed.txt service/requirements.txt
	test -x $(SEED_PY) || python3 -m venv .venv-seed
	$(SEED_PY) -m pip install -q --upgrade pip
	$(SEED_PY) -m pip install -q $(PIP_FAST) -c constraints-seed.txt -c service/requirements.txt -e '.[test]'
	touch $(SEED_STAMP)

# Debian packages the tests use: a real OpenSSH server, a real Chromium and a real HAProxy (fleet tests, demo --fleet).
system-deps:
	@if ! test -x /usr/sbin/sshd || ! command -v chromium >/dev/null || ! test -x /usr/sbin/haproxy; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server chromium haproxy >/dev/null; \
	fi

demo: setup
	$(PY) -m sdxl_deploy.cli demo

# The seed environment is installed while the main suite runs (its tests wait on processes much of the time);
# its output goes to .cache/setup-seed.log, shown if it fails.
test: setup
	$(PY) -m ruff check --no-cache .
	@nice -n 10 $(MAKE) --no-print-directory setup-seed > .cache/setup-seed.log 2>&1 & seed=$$!; \
	$(PY) $(PYTEST); status=$$?; \
	wait $$seed || { tail -n 40 .cache/setup-seed.log; echo "make setup-seed failed (.cache/setup-seed.log)"; exit 1; }; \
	exit $$status
	@$(MAKE) --no-print-directory test-seed

# Its own model cache: the generated models are written by that stack's diffusers.
test-seed: setup $(SEED_STAMP)
	SDXL_DEPLOY_CACHE=$(CURDIR)/.cache/models-seed $(SEED_PY) $(PYTEST) $(SEED_TESTS) $(SEED_SKIP)

# The main suite under coverage (every Python process the tests start too), then one report of what ships.
COVERAGE := COVERAGE_FILE=$(CURDIR)/.cache/coverage/data $(PY) -m coverage
coverage: setup
	rm -rf .cache/coverage && mkdir -p .cache/coverage
	$(COVERAGE) run $(PYTEST) $(PYTEST_ARGS) || true
	$(COVERAGE) combine -q && $(COVERAGE) report > .cache/coverage/report.txt
	@tail -n 1 .cache/coverage/report.txt

lint: setup
	$(PY) -m ruff check --no-cache .
	$(PY) -m ruff format --check --no-cache .

ui: setup
	bash scripts/ui.sh

clean:
	rm -rf .cache runs .venv-seed
