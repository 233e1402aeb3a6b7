PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint format demo bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'

test:
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff format --check src tests bench setup.py
	$(BIN)/ruff check src tests bench setup.py

format:
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

demo:
	$(BIN)/python -m ced_lightning.train experiment=student_demo

bench:
	$(BIN)/python -m bench.run $(BENCH_ARGS) && $(BIN)/python -m bench.readme

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
