# Everything a fresh machine needs, from bare Python. `make demo` and `make test` are the README's
# quick start. TORCH_SPEC is the torch requirement; the default is the CPU build pinned for the
# project's 2-core CI machines. Elsewhere: `make install TORCH_SPEC=torch` (or your CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test lint bench clean

$(BIN)/prefopt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/prefopt

install: $(BIN)/prefopt

demo: install
	$(BIN)/prefopt demo --output_dir runs/demo

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_dpo.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
