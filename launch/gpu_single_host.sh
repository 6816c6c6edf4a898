#!/usr/bin/env bash
# Train on every GPU of this host: one process drives all local GPUs.
#
# Usage:
#   launch/gpu_single_host.sh --config=configs/gpt2_small.py --workdir=runs/gpt2_small \
#     --config.data.path=/data/fineweb10B --config.data.tokenizer_path=/data/gpt2/tokenizer.json
#
#   CUDA_VISIBLE_DEVICES=0,1,2,3 launch/gpu_single_host.sh ...    # use a subset of the GPUs
#   XLA_FLAGS='--xla_dump_to=/tmp/hlo' launch/gpu_single_host.sh ... # your flags go last and win
#   JAXLM='.venv/bin/jaxlm' launch/gpu_single_host.sh ...           # a jaxlm not on PATH
#   eval "$(launch/gpu_single_host.sh --print-env)"                  # just export the settings
#   launch/gpu_single_host.sh eval --workdir=runs/gpt2_small          # any jaxlm command
#
# Arguments go to `jaxlm train`, or to `jaxlm` itself when the first one is a jaxlm command
# (train, eval, generate, ...). This file is the one source of the GPU XLA/NCCL settings:
# launch/slurm_gpu.sbatch runs it on every node and docker/Dockerfile.gpu uses it as the
# entrypoint.
# The XLA flags below target Hopper (H100/H200) with FSDP over scanned layers; they were
# checked to parse on jaxlib 0.10. Unknown flags abort XLA at startup, so re-check them
# when upgrading jaxlib.
set -euo pipefail

xla_flags=(
  # Overlap collectives with compute: schedule async all-gather/reduce-scatter early.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Prefetch the next scanned layer's FSDP all-gather / reduce-scatter inside the loop.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  --xla_gpu_enable_while_loop_double_buffering=true
  # Fewer, larger collectives (NCCL bandwidth is poor for small messages).
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_enable_all_gather_combine_by_dim=false
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
  # cuBLAS beats the Triton GEMM emitter on the large bf16 matmuls of an LM.
  --xla_gpu_enable_triton_gemm=false
)
export XLA_FLAGS="${xla_flags[*]} ${XLA_FLAGS:-}"

# JAX preallocates this fraction of GPU memory; 0.9 leaves room for cuDNN/NCCL workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# Reuse compiled programs across restarts (big models take minutes to compile).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jaxlm/xla}"
# NCCL: warnings only; set NCCL_DEBUG=INFO to see the topology and transports it picked.
# Multi-node clusters usually also need NCCL_SOCKET_IFNAME / NCCL_IB_HCA (site specific).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

if [[ "${1:-}" == "--print-env" ]]; then
  # For other programs (bench/throughput.py): eval "$(launch/gpu_single_host.sh --print-env)"
  for var in XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION JAX_COMPILATION_CACHE_DIR NCCL_DEBUG \
             TF_CPP_MIN_LOG_LEVEL; do
    printf 'export %s=%q\n' "$var" "${!var}"
  done
  exit 0
fi

case ${1:-} in
  train | eval | generate | plan | convert | finetune | prepare | tokenizer | help | -h | --help) ;;
  *) set -- train "$@" ;;
esac
exec ${JAXLM:-jaxlm} "$@"
