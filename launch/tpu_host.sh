#!/usr/bin/env bash
# Run jaxlm on one Cloud TPU VM worker with the TPU runtime settings (the TPU twin of
# gpu_single_host.sh, and the one source of these settings: launch/tpu_pod.sh runs it on
# every worker and docker/Dockerfile.tpu uses it as the entrypoint).
#
# Usage (on a worker; every worker of a multi-host slice runs the same command):
#   launch/tpu_host.sh --config=llama_8b --workdir=gs://bucket/runs/llama8b ...   # jaxlm train
#   launch/tpu_host.sh eval --workdir=gs://bucket/runs/llama8b                    # any command
#   LIBTPU_INIT_ARGS='--xla_tpu_foo=1' launch/tpu_host.sh ...   # your flags go last and win
#   JAXLM=~/jaxlm-venv/bin/jaxlm launch/tpu_host.sh ...         # a jaxlm not on PATH
#   eval "$(launch/tpu_host.sh --print-env)"                     # just export the settings
#
# jax.distributed finds the slice's other workers through the TPU metadata server
# (jaxlm/run/runtime.py). The libtpu flags below overlap FSDP all-gathers/reduce-scatters
# with compute (as in MaxText's v4/v5 recipes); they are not verified on TPU hardware
# here, and libtpu aborts on flags it does not know, so re-check them on a new libtpu.
set -euo pipefail

libtpu_flags=(
  # Run collectives asynchronously, fused with and overlapped by compute.
  --xla_tpu_enable_async_collective_fusion=true
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true
  --xla_tpu_overlap_compute_collective_tc=true
  --xla_enable_async_all_gather=true
  --xla_enable_async_reduce_scatter=true
  --xla_enable_async_all_reduce=true
)
export LIBTPU_INIT_ARGS="${libtpu_flags[*]} ${LIBTPU_INIT_ARGS:-}"
# Reuse compiled programs across restarts (jaxlm also turns the cache on by default).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jaxlm/xla}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

if [[ "${1:-}" == "--print-env" ]]; then
  for var in LIBTPU_INIT_ARGS JAX_COMPILATION_CACHE_DIR TF_CPP_MIN_LOG_LEVEL; do
    printf 'export %s=%q\n' "$var" "${!var}"
  done
  exit 0
fi

case ${1:-} in
  train | eval | generate | plan | convert | finetune | prepare | tokenizer | help | -h | --help) ;;
  *) set -- train "$@" ;;
esac
exec ${JAXLM:-jaxlm} "$@"
