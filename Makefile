# Sortie: `make demo` runs an example batch end to end, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install system-deps claude-code lint test test-fast demo up down bench clean ui histories prove

install: $(STAMP)

# The real Claude Code CLI, at the version the machine image pins (agent/Dockerfile names it once),
# in a project-local prefix: the end-to-end tests run it against a fake Messages API on loopback.
CLAUDE_CODE_VERSION := $(shell sed -n 's/^ARG CLAUDE_CODE_VERSION=//p' agent/Dockerfile)
CLAUDE_CODE_PREFIX := .state/claude-code
CLAUDE_CODE := $(CLAUDE_CODE_PREFIX)/node_modules/.bin/claude
CLAUDE_CODE_STAMP := $(CLAUDE_CODE_PREFIX)/.installed-$(CLAUDE_CODE_VERSION)
claude-code: $(CLAUDE_CODE_STAMP)
$(CLAUDE_CODE_STAMP): agent/Dockerfile | system-deps
	rm -rf $(CLAUDE_CODE_PREFIX) && mkdir -p $(CLAUDE_CODE_PREFIX)
	npm install --prefix $(CLAUDE_CODE_PREFIX) --no-audit --no-fund --loglevel=error \
	  "@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)"
	$(CLAUDE_CODE) --version | grep -qF "$(CLAUDE_CODE_VERSION)"
	touch $@

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# Debian packages the tests use: docker-compose validates docker-compose.yml (no Docker engine
# needed), curl replays Fly's documented requests against localfly, git builds test checkouts,
# node and npm install and run the real Claude Code CLI (package names: nodejs, npm), bwrap and
# socat are its sandbox on Linux (package names: bubblewrap, socat).
SYSTEM_TOOLS := docker-compose curl git node npm bwrap socat
system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || { pkg=$${tool/#node/nodejs}; missing="$$missing $${pkg/#bwrap/bubblewrap}"; }; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing:$$missing (install Debian's packages of those names)" >&2; exit 1; fi; fi

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

# Three test processes on CI's two cores (the tests mostly wait on machines and timers); each
# starts its own dev server and localfly.
# Lint runs beside the tests (mypy's 15 s of one core while the first tests start); either failing
# fails `make test`.
test: install system-deps claude-code
	@$(MAKE) --no-print-directory lint & lint=$$!; \
	$(PY) -m pytest -q -ra -n 3 --dist worksteal; tests=$$?; \
	wait $$lint || { echo "make test: lint failed" >&2; exit 1; }; exit $$tests

test-fast: install claude-code
	$(PY) -m pytest -q -x -m "not slow"

# Every guarantee in docs/guarantees.md taken out of the code on purpose (tests/mutations/), each
# in a scratch copy where its tests must go red; not part of `make test` (about 15 minutes).
prove: install system-deps claude-code
	$(PY) -m tests.mutations

demo: install
	$(PY) -m client.demo

# The local stack in the background for batches of your own: the dev server with its Web UI,
# localfly, the S3 store and a worker, under .state/ (idempotent). `make down` stops what it
# started and keeps the history for `make ui`.
up: install
	$(PY) -m client.local_stack up

down: install
	$(PY) -m client.local_stack down

bench: install
	$(PY) -m bench --standard

clean:
	rm -rf $(VENV) .state .pytest_cache .mypy_cache .ruff_cache

# Browse the demo's history in the Web UI again (Ctrl-C to stop).
ui: install
	$(VENV)/bin/temporal server start-dev --db-filename .state/temporal.db --ui-port 8233 \
	  --search-attribute BatchId=Keyword --ui-disable-news-fetch

# Re-record the replay fixtures under tests/histories/ (only after a deliberate workflow change).
histories: install
	SORTIE_RECORD_HISTORIES=1 $(PY) -m pytest -q tests/workflows/test_replay.py -k fresh
