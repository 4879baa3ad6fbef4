# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-loaded lint unit integration e2e bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,spark,promquery]'
	touch $(STAMP)

demo: $(STAMP)
	@bash scripts/system-deps demo
	$(BIN)/selfheal demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

integration: $(STAMP)
	$(BIN)/pytest tests/integration -q

e2e: $(STAMP)
	$(BIN)/pytest tests/e2e -q

test: lint
	$(BIN)/pytest tests -q

# Not part of `make test`: the suite three times beside a CPU hog per core (RUNS=n to change).
test-loaded: $(STAMP)
	bash scripts/loaded-test

bench: $(STAMP)
	$(BIN)/python bench/mttr.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
