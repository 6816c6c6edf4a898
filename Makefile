# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test,hf]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxlm train --config=configs/demo.py --workdir=runs/demo
	$(BIN)/jaxlm generate --workdir=runs/demo --prompt='def ' --max_new_tokens=200 --temperature=0.8 --top_k=40

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=900 tests

clean:
	rm -rf runs
