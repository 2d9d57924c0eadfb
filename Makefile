# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

$(BIN)/distillkac: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS) || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test lint
install: $(BIN)/distillkac

demo: install
	$(BIN)/distillkac demo --outdir demo-out

lint: install
	$(BIN)/ruff check src tests benchmarks

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q
