# mvd-deploy: every target sets itself up (a venv in .venv, torch first so pip takes the CPU wheel).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := build/demo

.PHONY: setup test demo bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

test: setup
	$(BIN)/pytest

# The longest chain that exists: a full-size MobileVD checkpoint (random init), inspect it, the
# paper's Table 8 stages on it, then every deploy pass, each exact one checked against its input.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/mvd-deploy init-checkpoint --model models/mobilevd.yaml --out $(DEMO)/mobilevd-ckpt --seed 0
	$(BIN)/mvd-deploy inspect $(DEMO)/mobilevd-ckpt
	$(BIN)/mvd-deploy inspect $(DEMO)/mobilevd-ckpt --stages
	$(BIN)/mvd-deploy passes $(DEMO)/mobilevd-ckpt

bench: setup
	$(BIN)/python bench/run.py

lint: setup
	$(BIN)/ruff check mvd_deploy tests bench
	$(BIN)/ruff format --check mvd_deploy tests bench

clean:
	rm -rf build $(VENV) bench/results
