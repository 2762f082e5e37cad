# Two commands set everything up: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: train test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torchvision needs the torch build it was compiled against: install them as a pair.
	$(BIN)/pip install "torch>=2.2" "torchvision>=0.17"
	$(BIN)/pip install -e ".[dev]"

train: $(BIN)/python
	$(BIN)/python train.py $(ARGS)

test: $(BIN)/python
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 $(ARGS)

lint: $(BIN)/python
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
