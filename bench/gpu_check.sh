#!/usr/bin/env bash
# Proves the GPU path on a machine with one NVIDIA GPU, in under 10 minutes, and writes a report.
#
#   bench/gpu_check.sh [--out DIR] [--wheels DIR] [--dry-run]
#
# 1. Installs jax with CUDA (`pip install "jax[cuda12]"` into a venv, or, offline, every wheel
#    in --wheels DIR; the rest of jaxlm's dependencies likewise) and jaxlm itself.
# 2. Attention kernels on the GPU: tests/model/test_attention.py with JAX_PLATFORMS=cuda
#    (cuDNN and the Pallas GPU flash kernel against the XLA reference, forward and backward,
#    bf16), and the sharding/model tests that run on one device.
# 3. Throughput (bench/throughput.py, under launch/gpu_single_host.sh's XLA flags): llama_1b at
#    8 x 2048 tokens, and llama_8b cut to 8 layers (its width, heads and vocab: the per-layer cost
#    of the 8B recipe on one GPU) at 2 x 8192, bf16 compute, flash attention; tokens/s/device,
#    MFU and peak memory.
# The report ($OUT/gpu_report.txt, plus one JSON line per throughput run in
# $OUT/throughput.jsonl) goes into bench/RESULTS.md by hand, with the date and this command.
# --dry-run prints each command instead of running it (used by tests/test_bench.py on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/gpu_check}"
wheels=""
dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
report="$out/gpu_report.txt"
: >"$report"

run() {  # echo the command into the report, then run it (or only echo it, with --dry-run)
  printf '$ %s\n' "$*" | tee -a "$report"
  if [[ $dry -eq 0 ]]; then
    "$@" 2>&1 | tee -a "$report"
  fi
}

py="${PYTHON:-python3}"
venv="${VENV:-/tmp/jaxlm-gpu-venv}"
if [[ $dry -eq 0 && ! -x "$venv/bin/python" ]]; then
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q)
if [[ -n "$wheels" ]]; then
  run "${pip[@]}" --no-index --find-links "$wheels" "jax[cuda12]" -e ".[test]"
else
  run "${pip[@]}" "jax[cuda12]" -e ".[test]"
fi
python="$venv/bin/python"

run "$python" -c "import jax; print(jax.devices()); assert jax.default_backend() == 'gpu'"
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# Kernel equality on the GPU: no fake CPU devices here, the real device.
run env JAX_PLATFORMS=cuda XLA_FLAGS= "$python" -m pytest -q \
  -p no:cacheprovider tests/model/test_attention.py -rs --timeout=300

# Throughput under the same XLA flags as launch/gpu_single_host.sh.
if [[ $dry -eq 0 ]]; then
  eval "$(launch/gpu_single_host.sh --print-env)"
fi
tp=("$python" bench/throughput.py --steps=10 --repeats=3 --json="$out/throughput.jsonl")
run "${tp[@]}" --config=llama_1b --config.train.batch_size=8 --config.data.seq_len=2048 \
  --config.model.dtype=bfloat16 --config.model.attention=cudnn --config.model.remat=dots \
  --config.mesh.fsdp=1 --config.mesh.data=1
run "${tp[@]}" --config=llama_8b --config.model.n_layers=8 --config.train.batch_size=2 \
  --config.train.grad_accum=1 --config.data.seq_len=8192 --config.model.dtype=bfloat16 \
  --config.model.attention=cudnn --config.model.remat=full \
  --config.mesh.fsdp=1 --config.mesh.data=1

echo "report: $report" >&2
