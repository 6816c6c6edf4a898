#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), install this repo on every worker,
# and run the same `jaxlm train ARGS` on all workers at once.
#
# Usage (from the repo root, with gcloud authenticated):
#   TPU_NAME=my-v5p ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 RUNTIME_VERSION=v2-alpha-tpuv5 \
#     launch/tpu_pod.sh --config=configs/llama_8b.py --workdir=gs://my-bucket/runs/llama8b \
#     --config.data.path=/mnt/data/tokens --config.data.tokenizer_path=/mnt/llama3/tokenizer.json
#
# Environment:
#   TPU_NAME          slice name (required)
#   ZONE              default us-central2-b
#   ACCELERATOR_TYPE  default v4-8; e.g. v4-32, v5litepod-16, v5p-64, v6e-16
#   RUNTIME_VERSION   default tpu-ubuntu2204-base (v4); v5e: v2-alpha-tpuv5-lite,
#                     v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
#   PROJECT           default: gcloud's configured project
#   INSTALL           'copy' (default): copy this working tree (tracked + untracked, not
#                     ignored files) to ~/jaxlm on every worker and install it with its
#                     tpu and cloud extras into a Python 3.11 venv, ~/jaxlm-venv, made by uv
#                     (uv fetches Python 3.11 if the image lacks it; jaxlm needs >= 3.11);
#                     'skip': the venv is already there;
#                     'docker': run IMAGE (docker/Dockerfile.tpu, pushed to a registry the
#                     workers can pull from) instead of a venv;
#                     anything else is a pip requirement installed into the venv, e.g.
#                     INSTALL='jaxlm[tpu,cloud] @ git+https://github.com/you/jaxlm@main'
#   IMAGE             with INSTALL=docker: e.g. us-docker.pkg.dev/PROJECT/repo/jaxlm:tpu
#   SPOT=1            create a Spot slice
#   MAX_RESTARTS      reruns of every worker after an exit 75 (default 3; see Restarts below)
#
# Every worker runs the same command, through launch/tpu_host.sh (LIBTPU_INIT_ARGS for
# async collectives, the persistent compilation cache in ~/.cache/jaxlm/xla on each worker);
# jax.distributed.initialize() finds the other workers through the TPU metadata server,
# so no coordinator address is needed. A --workdir on GCS
# (gs://...) or a shared disk is required on multi-host slices: all workers write one
# checkpoint. Stop a run with Ctrl-C here, then kill leftovers on the workers with
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command='pkill -f "jaxlm train"'
# and delete the slice when done: gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE"
#
# Restarts: a run that ends with exit 75 on some worker (preempted, or a lost or hung worker:
# every other worker then ends with 75 too, see `jaxlm train --help`) and no other failure
# is rerun on every worker, up to MAX_RESTARTS times (default 3; 0 = never), resuming from
# the last committed checkpoint. Each worker's status is read from a 'jaxlm-exit N' line it
# prints, so this does not depend on what `gcloud ... ssh --worker=all` returns.
#
# Preemption (Spot slices, maintenance): each worker gets SIGTERM; all workers agree on a
# step, commit one checkpoint to --workdir and exit 75 (see `jaxlm train --help` for the
# exit codes). A preempted slice is gone or restarted empty, so resume by running this
# script again with the same TPU_NAME and arguments once the slice (or its queued resource)
# is READY/ACTIVE again: it reinstalls and every worker resumes from the latest committed
# checkpoint. The workdir must outlive the slice (gs://...). Exit 3 (diverged), 4 (storage
# fault) and 2 (bad input) need a person, not a rerun. (Whether `gcloud ... ssh --worker=all`
# passes a worker's exit code on depends on the gcloud version; the log line 'stopped at
# step N; checkpoint saved' says the same.)
#
# Queued resources (how v5e/v5p/v6e capacity is usually granted): request the slice, wait
# for ACTIVE, then run this script with the same TPU_NAME (it reuses an existing slice):
#   gcloud compute tpus queued-resources create "$TPU_NAME-qr" --node-id="$TPU_NAME" \
#     --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION"
#   gcloud compute tpus queued-resources describe "$TPU_NAME-qr" --zone="$ZONE"  # state: ACTIVE
#
# Multislice (N slices joined over the data-center network): request them together with
#   gcloud compute tpus queued-resources create "$TPU_NAME-qr" --node-count=N \
#     --node-prefix="$TPU_NAME" --zone="$ZONE" --accelerator-type=... --runtime-version=...
# which creates slices "$TPU_NAME-0" ... "$TPU_NAME-<N-1>" and configures the MEGASCALE_*
# variables JAX uses to connect them. Run this script once per slice, concurrently, with
# TPU_NAME set to each slice's name and identical arguments, adding
# --config.mesh.dcn_data=N (data parallel across slices; FSDP/tensor stay inside a slice).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
INSTALL=${INSTALL:-copy}

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }
on_all_workers() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

if tpu describe "$TPU_NAME" --format='value(state)' >/dev/null 2>&1; then
  echo "tpu_pod: reusing $TPU_NAME"
else
  echo "tpu_pod: creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE"
  spot=()
  [[ -n ${SPOT:-} ]] && spot=(--spot)
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${spot[@]}"
fi

# uv on the worker: from pip if the image has it, else uv's standalone installer.
# shellcheck disable=SC2016  # $HOME and $PATH must expand on the worker, not here
get_uv='export PATH=$HOME/.local/bin:$PATH; command -v uv >/dev/null ||
  python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh'
make_venv='uv venv -q --python 3.11 --allow-existing ~/jaxlm-venv'

case $INSTALL in
  skip | docker) ;;
  copy)
    repo=$(git rev-parse --show-toplevel)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    archive=$tmp/jaxlm.tar.gz
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
      | tar -C "$repo" -czf "$archive" --null --ignore-failed-read -T -
    tpu scp "$archive" "$TPU_NAME:jaxlm.tar.gz" --worker=all
    on_all_workers "set -e; rm -rf ~/jaxlm; mkdir ~/jaxlm; tar -xzf ~/jaxlm.tar.gz -C ~/jaxlm
      $get_uv; $make_venv
      uv pip install -q --python ~/jaxlm-venv/bin/python -e ~/jaxlm'[tpu,cloud]'"
    ;;
  *)
    on_all_workers "set -e; $get_uv; $make_venv
      uv pip install -q --python ~/jaxlm-venv/bin/python 'jax[tpu]' gcsfs $(printf '%q' "$INSTALL")"
    ;;
esac

# Quote each argument so the remote shell sees exactly what was typed here.
args=$(printf ' %q' "$@")
if [[ $INSTALL == docker ]]; then
  : "${IMAGE:?set IMAGE to the jaxlm TPU image (docker/Dockerfile.tpu) for INSTALL=docker}"
  # --privileged: the TPU chips; --net=host: the other workers and the metadata server.
  train="sudo docker run --rm --privileged --net=host \
    -v \$HOME/.cache/jaxlm:/root/.cache/jaxlm $(printf '%q' "$IMAGE") train$args"
else
  # The TPU settings travel as launch/tpu_host.sh whatever INSTALL was.
  tpu scp "$(dirname "$0")/tpu_host.sh" "$TPU_NAME:jaxlm_tpu_host.sh" --worker=all
  # Run from the copied tree when there is one (relative --config/data paths), else from ~.
  train="cd ~/jaxlm 2>/dev/null || cd ~
    JAXLM=\$HOME/jaxlm-venv/bin/jaxlm bash ~/jaxlm_tpu_host.sh train$args"
fi
max_restarts=${MAX_RESTARTS:-3}
log=$(mktemp)
for ((attempt = 0; ; attempt++)); do
  # shellcheck disable=SC2016  # $? is the worker's
  on_all_workers "$train; echo \"jaxlm-exit \$?\"" 2>&1 | tee "$log" || true
  codes=$(sed -n 's/.*jaxlm-exit \([0-9]*\).*/\1/p' "$log" | sort -u | tr '\n' ' ')
  echo "tpu_pod: worker exit statuses: ${codes:-none reported}"
  if [[ $codes == '0 ' ]]; then
    rm -f "$log"
    exit 0
  fi
  if [[ $codes != '75 ' && $codes != '0 75 ' ]] || ((attempt >= max_restarts)); then
    rm -f "$log"
    echo "tpu_pod: not rerunning (statuses: ${codes:-none}; restarts used $attempt of $max_restarts)" >&2
    exit 1
  fi
  echo "tpu_pod: exit 75 (preempted, or a worker lost or hung): rerunning every worker" \
    "($((attempt + 1)) of $max_restarts)"
done
