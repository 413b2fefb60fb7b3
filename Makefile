# The two commands a newcomer needs: `make test` and `make example`.
# Each creates its own virtual environment (.venv) and installs what it needs into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: test servers lint types unit unit-fast example example-dashboard example-fastapi bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,example,fastapi,bench]'
	touch $@

## Every check: lint, format, strict types, tests with branch coverage.
test: servers lint types unit

## The servers the tests start (redis-server, PostgreSQL, RabbitMQ): installed when possible, else one clear line.
servers:
	@bash scripts/servers.sh

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(VENV)/.dev
	$(BIN)/mypy --strict eventbus

unit: $(VENV)/.dev servers
	$(BIN)/pytest --cov --cov-report=term

## The quick subset while working: no real servers, no child processes (under 30 s).
unit-fast: $(VENV)/.dev
	$(BIN)/pytest -m "not integration and not multiprocess"

## The order-service demo: creates orders, ships some, drains, prints a summary.
example: $(VENV)/.dev
	$(BIN)/python -m examples.order_service demo

## The dashboard on the demo's database (run `make example` first): http://127.0.0.1:8089/
example-dashboard: $(VENV)/.dev
	$(BIN)/python -m eventbus dashboard --store examples/order_service/var/demo.sqlite3

## The asyncio example: a FastAPI service on http://127.0.0.1:8000 (Ctrl-C stops it).
example-fastapi: $(VENV)/.dev
	$(BIN)/python -m examples.fastapi_orders

## Benchmarks against blinker, pyee and raw thread pools, in one run.
bench: $(VENV)/.dev
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .coverage htmlcov
