# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned versions (see the file's header): a free resolve of the cloud extras runs pip out of depth.
PIP_INSTALL := $(BIN)/pip install -q -c .ci/constraints.txt

.PHONY: install demo test test-cloud test-beam test-slurm test-package test-demo test-slow test-aot test-notebook test-faults clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs only the package; tests add pytest and the HF extra
# (transformers + the CPU torch wheel) for the import/export parity tests.
$(VENV)/.installed: $(BIN)/python pyproject.toml .ci/constraints.txt
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test,hf,eval]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/jaxlm train --config=configs/demo.py --workdir=runs/demo
	$(BIN)/jaxlm generate --workdir=runs/demo --prompt='def ' --max_new_tokens=200 --temperature=0.8 --top_k=40

test: $(VENV)/.installed-test
	$(BIN)/lint-imports --no-cache  # the layers and no cycles (pyproject.toml's contracts)
	$(BIN)/python -m pytest -q -x --timeout=900 tests

# Real runs on gs:// against fake-gcs-server on localhost (tests/cloud; a few minutes).
$(VENV)/.installed-test-cloud: $(VENV)/.installed-test
	$(PIP_INSTALL) -e '.[test-cloud]'
	touch $@

test-cloud: $(VENV)/.installed-test-cloud
	$(BIN)/python -m pytest -q -x --timeout=2400 -m cloud tests/cloud

# `jaxlm prepare --runner=beam` on Beam's DirectRunner (multi-processing, 2 workers), local
# and on the GCS emulator. Its own venv: apache-beam needs protobuf<7 and pyarrow<26.
BEAM_VENV := .venv-beam
$(BEAM_VENV)/.installed-test-beam: pyproject.toml .ci/constraints-beam.txt
	$(PYTHON) -m venv $(BEAM_VENV)
	$(BEAM_VENV)/bin/pip install -q --upgrade pip
	$(BEAM_VENV)/bin/pip install -q -c .ci/constraints-beam.txt -e '.[test-cloud,beam]'
	touch $@

test-beam: $(BEAM_VENV)/.installed-test-beam
	$(BEAM_VENV)/bin/python -m pytest -q -x --timeout=1800 -m beam tests/beam

# launch/slurm_gpu.sbatch on a one-node SLURM cluster started by the test (root; Debian's
# slurm-wlm and munge, installed here when missing).
test-slurm: $(VENV)/.installed-test
	command -v slurmctld >/dev/null && command -v munged >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge; }
	$(BIN)/python -m pytest -q -x --timeout=1800 -m slurm tests/slurm

# `pip install .` (not editable) into a fresh venv; commands run outside the checkout.
test-package: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -x --timeout=2400 -m package tests/package

# `make demo`'s own commands (read from this file) with 40 of its 500 steps (about a minute).
test-demo: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -x --timeout=900 -m demo tests/demo

# Tests whose behaviour a cheaper make-test test covers too (e.g. more pipeline layouts; a few minutes).
test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -x --timeout=1800 -m slow tests

# Compiles for TPU v5p and NVIDIA H100 targets with their own compilers on this CPU host
# (libtpu, the CUDA PJRT plugin: the aot-tpu and aot-gpu extras). They live in a venv of their
# own, .venv-aot: in .venv they would change jax's default backend for every other test.
AOT_VENV := .venv-aot
$(AOT_VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/pip install -q --upgrade pip
	$(AOT_VENV)/bin/pip install -q -c .ci/constraints.txt -e '.[test,aot-tpu,aot-gpu]'
	touch $@

test-aot: $(AOT_VENV)/.installed
	JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 $(AOT_VENV)/bin/python -m pytest -q -x --timeout=2400 -m aot tests/aot

# notebooks/quickstart.ipynb top to bottom on CPU with nbclient (about 2-3 minutes).
$(VENV)/.installed-notebook: $(VENV)/.installed-test
	$(PIP_INSTALL) -e '.[test,eval,notebook]'
	touch $@

test-notebook: $(VENV)/.installed-notebook
	$(BIN)/python -m pytest -q -x --timeout=900 -m notebook tests/notebooks

# Multi-host faults on 127.0.0.1: kill -9 of a worker and of the coordinator, a hung hook
# (two `jaxlm train` processes started directly; prints the goodput figures; ~8 min).
test-faults: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -x -s --timeout=1200 -m faults tests/test_faults.py

clean:
	rm -rf runs
