# The two commands a newcomer needs: `make run` and `make test`.
PY ?= python3
PORT ?= 8000
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint clean bench

# install into .venv. torch is pinned first to the CPU build that lies on this
# machine's disk; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[train,tools,dev]"
	touch $(STAMP)

install: $(STAMP)

# the whole local stack: Redis, the ranking service, the continuous trainer
# (on an empty models/ it first trains a version on simulated history); Ctrl-C stops it
run: $(STAMP)
	$(BIN)/watchnext up --demo 60 --port $(PORT)

test: $(STAMP)
	$(BIN)/ruff check watchnext training service analysis simulation cli tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) models checkpoints data .pytest_cache
