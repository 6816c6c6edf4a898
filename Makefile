# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs only the package; tests add pytest and the HF extra
# (transformers + the CPU torch wheel) for the import/export parity tests.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,hf,eval]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/jaxlm train --config=configs/demo.py --workdir=runs/demo
	$(BIN)/jaxlm generate --workdir=runs/demo --prompt='def ' --max_new_tokens=200 --temperature=0.8 --top_k=40

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -x --timeout=900 tests

clean:
	rm -rf runs
