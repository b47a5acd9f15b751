# Everything a fresh machine needs, from bare Python. `make demo` and `make test` are the README's
# quick start. TORCH_SPEC is the torch requirement; the default is the CPU build pinned for the
# project's 2-core CI machines. Elsewhere: `make install TORCH_SPEC=torch` (or your CUDA build).
# `make install`/`make test` install the versions in constraints.txt (what the suite last passed
# with, so CI is reproducible), with the dev and deepspeed extras (the DeepSpeed ZeRO tests run on CPU
# in the suite); `make test-latest` installs whatever PyPI gives today instead.
PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
LATEST_BIN := $(LATEST_VENV)/bin
PYTEST_ARGS ?=
# Test processes (pytest-xdist): 2 for the 2-core CI machine; `make test PYTEST_WORKERS=0` runs serially.
# loadscope keeps each module's tests in one process, so a module-scoped trained run is made once.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadscope

.PHONY: install demo test test-fast test-deepspeed test-latest lint bench clean

$(BIN)/prefopt: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,deepspeed]"
	touch $(BIN)/prefopt

install: $(BIN)/prefopt

demo: install
	$(BIN)/prefopt demo --output_dir runs/demo

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest tests $(XDIST) $(PYTEST_ARGS)

# The quick loop while developing: everything but the whole-run tests marked `slow`.
test-fast: install
	$(BIN)/python -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

# The DeepSpeed ZeRO tests alone (`make test` runs them too; the install includes the deepspeed extra).
test-deepspeed: install
	$(BIN)/python -m pytest tests/training/test_deepspeed.py -rs $(PYTEST_ARGS)

# Today's PyPI versions (torch still from TORCH_SPEC), in a separate environment.
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_BIN)/pip install -q --upgrade pip
	$(LATEST_BIN)/pip install -q "$(TORCH_SPEC)"
	$(LATEST_BIN)/pip install -q --upgrade --upgrade-strategy eager -e ".[dev,deepspeed]"
	$(LATEST_BIN)/pip list 2>/dev/null | grep -iE "^(transformers|accelerate|peft|datasets|tokenizers|torch) "
	$(LATEST_BIN)/ruff check src tests benchmarks
	$(LATEST_BIN)/python -m pytest tests $(XDIST) $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/bench_dpo.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs .pytest_cache .ruff_cache
