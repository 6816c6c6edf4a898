#!/usr/bin/env bash
# Run N cooperating JAX processes on this machine's CPU, as a stand-in for a multi-host pod.
#
# Usage:
#   launch/local_multiprocess.sh N CMD [ARGS...]
#   launch/local_multiprocess.sh 2 jaxlm train --config=configs/tiny.py --workdir=/tmp/mp \
#     --config.data.path=../shared/data/tinyshakespeare.txt
#   DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh 4 jaxlm train ...   # 4 x 2 = 8 devices
#
# Process i gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=
# ${DEVICES_PER_PROCESS:-4} (plus any XLA_FLAGS you set), and JAXLM_COORDINATOR_ADDRESS
# (127.0.0.1:${JAXLM_PORT:-a free port}), JAXLM_NUM_PROCESSES=N and JAXLM_PROCESS_ID=i, which
# the jaxlm runtime passes to jax.distributed.initialize (with gloo CPU collectives).
# Output lines are prefixed [p0], [p1], ... The script waits for all processes; if one fails
# or you press Ctrl-C, it stops the rest (SIGTERM: a trainer saves and exits 75) and exits
# non-zero with the first failure's status. At the end it prints each process's exit status
# ("local_multiprocess: exit status p0=75 p1=137"; 128+N: ended by signal N). Needs bash >= 5.1.
set -euo pipefail

if (($# < 2)) || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
fi
n=$1
shift

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
    2>/dev/null || echo $((20000 + RANDOM % 20000))
}
port=${JAXLM_PORT:-$(free_port)}

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4} ${XLA_FLAGS:-}"
export JAXLM_COORDINATOR_ADDRESS="127.0.0.1:$port"
export JAXLM_NUM_PROCESSES=$n

# Job control puts each process (and its output prefixer) in its own process group, so one
# `kill -- -PID` stops it all, and Ctrl-C reaches only this script, which then cleans up.
set -m
pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
}
trap 'stop_all; wait; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  (
    set -o pipefail
    JAXLM_PROCESS_ID=$i "$@" 2>&1 | sed -u "s/^/[p$i] /"
  ) &
  pids+=("$!")
done
set +m  # groups are assigned at launch; this only silences bash's job-status notices

status=0
declare -A codes=()
for ((i = 0; i < n; i++)); do
  code=0 done_pid=''
  wait -n -p done_pid || code=$?
  [[ -n ${done_pid:-} ]] && codes[$done_pid]=$code
  ((code == 0)) && continue
  if ((status == 0)); then
    status=$code
    echo "local_multiprocess: a process exited with status $code; stopping the others" >&2
    stop_all
  fi
done
line=''
for ((i = 0; i < n; i++)); do
  pid=${pids[$i]}
  if [[ -z ${codes[$pid]:-} ]]; then  # reaped together with another: bash kept its status
    code=0
    wait "$pid" 2>/dev/null || code=$?
    codes[$pid]=$code
  fi
  line+=" p$i=${codes[$pid]}"
done
echo "local_multiprocess: exit status$line" >&2
exit "$status"
