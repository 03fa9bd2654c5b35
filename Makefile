# Two set-up commands matter: `make demo` and `make test`. Both create the environment first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export PREFECT_HOME ?= $(CURDIR)/.cache/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export HF_HUB_OFFLINE ?= 1
export SDXL_DEPLOY_CACHE ?= $(CURDIR)/.cache/models

.PHONY: setup demo test lint ui clean system-deps

setup: $(STAMP)
	@mkdir -p "$(PREFECT_HOME)" "$(SDXL_DEPLOY_CACHE)"

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory system-deps
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Debian packages the tests use: a real OpenSSH server and a real Chromium.
system-deps:
	@if ! test -x /usr/sbin/sshd || ! command -v chromium >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server chromium >/dev/null; \
	fi

demo: setup
	$(PY) -m sdxl_deploy.cli demo

test: setup
	$(PY) -m ruff check --no-cache .
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(PY) -m ruff check --no-cache .
	$(PY) -m ruff format --check --no-cache .

ui: setup
	bash scripts/ui.sh

clean:
	rm -rf .cache runs
