"""Process-level setup: logging, jax.distributed and the compilation cache, once per process.

Multi-host runs call ``jax.distributed.initialize`` here and nowhere else:
  * explicit: ``--coordinator_address/--num_processes/--process_id`` or the
    ``JAXLM_COORDINATOR_ADDRESS / JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID`` env vars;
  * SLURM with more than one task: jax's SLURM detection. With one task per
    node (launch/slurm_gpu.sbatch) each process gets *all* of its node's GPUs;
    jax alone would give it only the GPU numbered ``SLURM_LOCALID`` (0). With
    one task per GPU jax's default (GPU ``SLURM_LOCALID``) is right and kept;
  * Cloud TPU VMs (libtpu installed and TPU chips present): always, with no
    arguments: jax finds the slice's other workers through the TPU metadata
    server (or GKE's variables), and a single-host slice is a 1-process cluster.
"""

import ctypes
import glob
import importlib.metadata
import importlib.util
import logging
import os
import sys

import jax

from jaxlm.checkpoint import quiet

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
  quiet.quiet_orbax_errors()  # a failed save is the one line the CLI prints


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1,
               peer_timeout: float = 0) -> None:
  """Joins the multi-controller runtime if this is one of several processes.

  ``peer_timeout`` > 0 (``jaxlm train --peer_timeout``): every process watches
  the others (jaxlm.run.peers) and a lost one ends the run with exit 75 and one
  line; jax's own heartbeat (which aborts with a C++ stack trace, see
  jaxlm.run.supervise) is set to fire only after it.
  """
  global _initialized
  if _initialized:
    return
  setup_logging()
  if cpu_only():
    reuse_host_memory()  # before jax starts its CPU client's threads
  addr = coordinator_address or os.environ.get('JAXLM_COORDINATOR_ADDRESS', '')
  nproc = num_processes or int(os.environ.get('JAXLM_NUM_PROCESSES', '0') or 0)
  pid = process_id if process_id >= 0 else int(os.environ.get('JAXLM_PROCESS_ID', '-1') or -1)
  slurm = _slurm_tasks() > 1
  explicit = bool(addr and nproc > 1)
  if (explicit or slurm) and os.environ.get('JAX_PLATFORMS') == 'cpu':
    # CPU rehearsal of a multi-host run: collectives over gloo on loopback.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kw = {}
  if peer_timeout > 0:
    # jax's own detection stays as a backstop, a little after ours (which names the host).
    kw['heartbeat_timeout_seconds'] = int(peer_timeout) + 30
  if explicit:
    jax.distributed.initialize(addr, nproc, pid, local_device_ids=slurm_local_device_ids(), **kw)
  elif slurm:
    jax.distributed.initialize(local_device_ids=slurm_local_device_ids(), **kw)
  elif on_cloud_tpu_vm():
    jax.distributed.initialize(**kw)
  _initialized = True
  from jaxlm.run import watchdog  # noqa: PLC0415
  watchdog.install()  # compile time does not count against train.step_timeout
  if peer_timeout > 0 and jax.process_count() > 1:
    from jaxlm.run import peers  # noqa: PLC0415
    peers.start(peer_timeout, addr)
  enable_compilation_cache()
  log.info('process %d/%d: %d local devices, %d global (%s)', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count(),
           jax.devices()[0].device_kind)
  if jax.process_index() != 0:
    log.setLevel(logging.WARNING)  # one console voice: process 0's


def cpu_only() -> bool:
  """Whether jax can only run on its CPU backend here, decided without starting a backend.

  True when ``JAX_PLATFORMS`` puts cpu first, or when it is unset and no
  accelerator can load: jax finds GPUs and TPUs only through PJRT plugins (the
  ``jax_plugins`` namespace or entry points) and libtpu.
  """
  platforms = jax.config.jax_platforms or ''  # JAX_PLATFORMS, or set in code
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  if importlib.util.find_spec('jax_plugins') is not None or \
      importlib.util.find_spec('libtpu') is not None:
    return False
  return not importlib.metadata.entry_points(group='jax_plugins')


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
KEEP_FREED_BYTES = 256 << 20  # freed heap kept mapped for reuse before glibc trims it


def reuse_host_memory() -> bool:
  """Makes glibc's malloc reuse freed memory instead of mapping fresh pages each time.

  XLA:CPU mallocs every step's temporary buffer (43 MB for nanoGPT's CPU model
  at batch 12) and frees it when the step ends. glibc maps any request over
  32 MB afresh with mmap (and a thread's own arena unmaps a heap it emptied),
  so each step page-faulted ~10,500 new pages: ~21 ms of kernel time in a
  ~90 ms step (bench/RESULTS.md, issue 19). Here every thread shares glibc's
  main heap, large requests come from it, and up to KEEP_FREED_BYTES of freed
  memory stays mapped. Call before jax's CPU client starts its threads (their
  arenas are chosen at their first malloc). Returns False where glibc is not
  the C library (nothing changes).

  The heap still grows by one temp buffer a few times early in a process (1-3
  steps of the first ~20, rarely one later, then never): XLA frees a step's
  temp on its worker thread after marking the step's outputs ready, so the
  next step may allocate first on the other worker; and a freed temp that
  small allocations hem in cannot merge with free neighbours, so it is too
  short for posix_memalign's padded request of the same size. No mallopt
  setting avoids either; the steady state after is fault-free.
  """
  mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)  # glibc only (not macOS, musl)
  if mallopt is None:
    return False
  ok = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
        mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)]
  return all(r == 1 for r in ok)


def trim_host_memory() -> None:
  """Hands freed heap memory back to the OS now (glibc's malloc_trim; a no-op elsewhere).

  For code that frees large buffers in turn and must not grow by each (the HF
  export reads a layer's arrays, writes them and drops them: without a trim
  the process grew by about a layer per layer, 1.5 -> 3.2 GiB for a 1B model).
  """
  trim = getattr(ctypes.CDLL(None), 'malloc_trim', None)  # glibc only, as mallopt
  if trim is not None:
    trim(0)


def _slurm_tasks() -> int:
  if not os.environ.get('SLURM_JOB_ID'):
    return 0
  return int(os.environ.get('SLURM_STEP_NUM_TASKS') or os.environ.get('SLURM_NTASKS') or 1)


def slurm_local_device_ids() -> list[int] | None:
  """All GPUs of this node when SLURM runs one task per node; None (jax decides) otherwise."""
  if _slurm_tasks() < 1:
    return None
  nodes = int(os.environ.get('SLURM_STEP_NUM_NODES') or os.environ.get('SLURM_NNODES') or 1)
  if _slurm_tasks() != nodes:
    return None  # several tasks per node: one GPU each, jax's SLURM_LOCALID default
  visible = os.environ.get('CUDA_VISIBLE_DEVICES', '')
  n = len([d for d in visible.split(',') if d.strip()]) if visible else \
      int(os.environ.get('SLURM_GPUS_ON_NODE') or 0)
  return list(range(n)) if n else None


def on_cloud_tpu_vm() -> bool:
  """A Cloud TPU VM (or GKE TPU node): libtpu installed and TPU chips visible to this host."""
  if os.environ.get('JAX_PLATFORMS', 'tpu') not in ('', 'tpu') and \
      'tpu' not in os.environ.get('JAX_PLATFORMS', ''):
    return False
  has_libtpu = importlib.util.find_spec('libtpu') is not None
  return has_libtpu and bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def enable_compilation_cache() -> None:
  """jax's persistent compilation cache, on every platform: restarts skip recompiling.

  ``JAX_COMPILATION_CACHE_DIR`` (set by the launch scripts) wins; the default is
  ``~/.cache/jaxlm/xla``, local to each host (the cache is keyed by program and
  backend, so hosts never share entries wrongly).
  """
  if jax.config.jax_compilation_cache_dir:
    return  # set by the user (JAX_COMPILATION_CACHE_DIR or jax.config)
  cache = os.path.join(os.path.expanduser('~'), '.cache', 'jaxlm', 'xla')
  try:
    os.makedirs(cache, exist_ok=True)
  except OSError:
    return  # a read-only home: run without a cache
  jax.config.update('jax_compilation_cache_dir', cache)


def multi_process_env(argv: list[str]) -> bool:
  """Whether ``jaxlm train argv`` will join a multi-process run (decided before jax starts)."""
  n = os.environ.get('JAXLM_NUM_PROCESSES', '')
  for a in argv:
    if a.startswith('--num_processes='):
      n = a.split('=', 1)[1]
  return (n.isdigit() and int(n) > 1) or _slurm_tasks() > 1 or on_cloud_tpu_vm()


def is_main() -> bool:
  return jax.process_index() == 0
