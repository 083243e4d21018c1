# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv and install the locked dependencies (uv.lock) first.

# Debian's interpreter: Triton's Python-backend stub links Debian's
# libpython3.11, so the venv it imports from must be built on the same one.
PYTHON ?= $(shell command -v /usr/bin/python3.11 || command -v python3.11)
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
SYNCED := $(VENV)/.synced-$(shell cat uv.lock pyproject.toml | sha256sum | cut -c1-16)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export PYTHONUNBUFFERED := 1

.PHONY: install services browser pgbouncer test lint format demo bench clean

install: $(SYNCED)

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Python 3.11 is required (apt-get install python3.11-venv)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(BIN)/uv: | $(BIN)/python
	$(BIN)/pip install --quiet uv==$(UV_VERSION)

$(SYNCED): uv.lock pyproject.toml | $(BIN)/uv
	$(BIN)/uv sync --frozen --python $(BIN)/python
	rm -f $(VENV)/.synced-* && touch $@

services:
	@scripts/ensure_services.sh

browser:
	@scripts/ensure_browser.sh

pgbouncer:
	@scripts/ensure_pgbouncer.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install services browser pgbouncer lint
	DJANGO_SETTINGS_MODULE=gymbilling.settings.test $(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/pytest $(PYTEST_ARGS)

demo: install
	@scripts/demo.sh

bench: install services
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis
