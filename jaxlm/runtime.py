"""Process-level setup: logging and jax.distributed, done once per process.

Multi-host runs call ``jax.distributed.initialize`` here and nowhere else. It
auto-detects Cloud TPU pods and SLURM; elsewhere the coordinator comes from
``--coordinator_address/--num_processes/--process_id`` or the
``JAXLM_COORDINATOR_ADDRESS / JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID`` env vars.
"""

import logging
import os
import sys

import jax

log = logging.getLogger('jaxlm')
_initialized = False


class _CurrentStderr(logging.StreamHandler):
  """Writes to whatever sys.stderr is now (it may be swapped, e.g. by tests)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, _):
    pass


def setup_logging() -> None:
  if not log.handlers:
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter('%(asctime)s jaxlm: %(message)s', '%H:%M:%S'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  # Orbax and absl are chatty at INFO; keep the console for the user's run.
  logging.getLogger('absl').setLevel(logging.WARNING)


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1) -> None:
  """Joins the multi-controller runtime if this is one of several processes."""
  global _initialized
  if _initialized:
    return
  setup_logging()
  addr = coordinator_address or os.environ.get('JAXLM_COORDINATOR_ADDRESS', '')
  nproc = num_processes or int(os.environ.get('JAXLM_NUM_PROCESSES', '0') or 0)
  pid = process_id if process_id >= 0 else int(os.environ.get('JAXLM_PROCESS_ID', '-1') or -1)
  auto = bool(os.environ.get('SLURM_JOB_ID') and int(os.environ.get('SLURM_NTASKS', '1')) > 1) \
      or bool(os.environ.get('TPU_WORKER_HOSTNAMES', '').count(','))
  if addr and nproc > 1:
    if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get('JAX_PLATFORMS') == 'cpu':
      # CPU rehearsal of a multi-host run: collectives over gloo on loopback.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(addr, nproc, pid)
  elif auto:
    jax.distributed.initialize()
  _initialized = True
  log.info('process %d/%d: %d local devices, %d global (%s)', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count(),
           jax.devices()[0].device_kind)
  if jax.process_index() != 0:
    log.setLevel(logging.WARNING)  # one console voice: process 0's


def is_main() -> bool:
  return jax.process_index() == 0
