"""`jaxlm plan`: compile the real train step for a mesh of any size and check that it fits.

The figures are XLA's memory analysis of the compiled step, per device:
arguments (params, optimizer state, batch), temporaries (activations and
workspace) and outputs not aliased to donated arguments. When the mesh needs
more devices than this host has, the step compiles in a child process that sees
that many fake CPU devices (``--xla_force_host_platform_device_count``):
compile only, nothing is allocated. XLA:CPU's buffer assignment indicates, but
does not equal, the GPU/TPU figure; on an accelerator host with enough devices
the step compiles for the real backend.

When the step does not fit the target, ``search`` compiles it again with more
gradient-accumulation micro-batches (and, if that is not enough, heavier remat)
to find the smallest ``train.grad_accum`` that fits.
"""

import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np

from jaxlm import collectives
from jaxlm import mesh as mesh_lib
from jaxlm.errors import ConfigError, JaxlmError
from jaxlm.model import pipeline

GiB = 2**30
MiB = 2**20

# HBM per device, as the driver reports it (nvidia-smi, Cloud TPU docs).
TARGETS = {
    'a100-80g': 81920 * MiB,
    'h100-80g': 81559 * MiB,
    'h200': 143771 * MiB,
    'v5e': 16 * GiB,
    'v5p': 95 * GiB,
    'v6e': 32 * GiB,
}
# Share of HBM the step may use: the rest is for the runtime, fragmentation and
# the difference between XLA:CPU's buffer assignment and the accelerator's.
# (On GPU, JAX preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says more.)
USABLE = 0.9

# Remat policies from most memory (least recompute) to least.
REMAT_ORDER = ('none', 'dots', 'minimal', 'full')

_EVENT = 'JAXLM-PLAN '  # prefix of the child's JSON lines on stdout


def target_budget(target: str) -> tuple[str, float | None]:
  """(description, usable bytes per device) for a --target name or a number of GiB.

  '' means the local accelerator (its allocator's limit); None bytes when
  there is none (a CPU host: figures only).
  """
  if target in TARGETS:
    return f'{target}: {TARGETS[target] / GiB:.1f} GiB HBM', TARGETS[target] * USABLE
  if target:
    try:
      gib = float(target)
    except ValueError:
      raise ConfigError(f"--target='{target}' is not one of {', '.join(TARGETS)} "
                        'or a number of GiB') from None
    return f'{gib:g} GiB per device', gib * GiB * USABLE
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != 'cpu' else None
  if not stats or 'bytes_limit' not in stats:
    return 'none (no accelerator here; pass --target)', None
  return f"local {dev.device_kind}: {stats['bytes_limit'] / GiB:.1f} GiB usable", float(
      stats['bytes_limit'])


def mesh_devices(cfg, requested: int = 0) -> int:
  """Devices the mesh is planned for: ``requested``, else this host's count when
  the config's mesh fits it, else the smallest mesh the config describes (each
  -1 axis taken as 1)."""
  sizes = [int(cfg.mesh[k]) for k in mesh_lib.MESH_AXES + tuple(mesh_lib.DCN_AXES)]
  fixed = math.prod(s for s in sizes if s != -1)
  if requested:
    return requested
  host = jax.device_count()
  if -1 in sizes and host % fixed == 0:
    return host
  return fixed


def figures(cfg, mesh, with_sizes: bool = False) -> dict:
  """XLA's per-device bytes for the config's train step on ``mesh`` (compiles it);
  with ``with_sizes`` also the parameter count and params/optimizer-state bytes."""
  from jaxlm.engine import Setup  # noqa: PLC0415  (engine imports the train step)
  setup = Setup(cfg, mesh)
  out = {'remat': cfg.model.remat, 'grad_accum': int(cfg.train.grad_accum),
         'per_device_batch': cfg.train.batch_size // cfg.train.grad_accum
         // mesh_lib.data_parallel_size(mesh)}
  if with_sizes:
    out.update(_sizes(setup.abstract_state))
  compiled = setup.compile_train_step()
  mem = compiled.memory_analysis()
  out['collectives'] = collectives.collective_bytes(compiled.as_text())
  stages = mesh_lib.pipeline_stages(mesh)
  if stages > 1:
    out['pipeline'] = {'stages': stages, 'microbatches': pipeline.microbatches(cfg.model, stages),
                       'repeats': int(cfg.model.pipeline_repeats)}
    out['pipeline']['bubble'] = pipeline.bubble_fraction(*out['pipeline'].values())
  if mem is not None:
    out.update(args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
               outputs=mem.output_size_in_bytes - mem.alias_size_in_bytes)
    out['total'] = out['args'] + out['temp'] + out['outputs']
  return out


def _sizes(state) -> dict:
  """Parameter count and bytes of params and optimizer state, total and per device."""
  def per_device(tree):
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))

  def total(tree):
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

  return {'n_params': sum(x.size for x in jax.tree.leaves(state.params)),
          'params': total(state.params), 'params_per_device': per_device(state.params),
          'opt_state': total(state.opt_state),
          'opt_state_per_device': per_device(state.opt_state)}


def grad_accum_options(cfg, mesh) -> list[int]:
  """train.grad_accum values above the config's that split the batch evenly over the mesh."""
  bs, dp = int(cfg.train.batch_size), mesh_lib.data_parallel_size(mesh)
  stages = mesh_lib.pipeline_stages(mesh)
  if stages > 1:  # each pipeline micro-batch must split over the data-parallel devices
    dp *= pipeline.microbatches(cfg.model, stages)
  return [g for g in range(int(cfg.train.grad_accum) + 1, bs + 1)
          if bs % g == 0 and (bs // g) % dp == 0]


def _with(cfg, remat: str, grad_accum: int):
  c = cfg.copy_and_resolve_references()
  c.model.remat, c.train.grad_accum = remat, grad_accum
  return c


def search(cfg, mesh, budget: float | None, report) -> None:
  """Compiles the configured step, then (if it exceeds ``budget`` bytes) finds the
  smallest grad_accum that fits, trying heavier remat if needed. ``report(event)``
  receives each result as a dict: 'first' (with sizes), 'trial's, then 'choice' or 'none'."""
  first = figures(cfg, mesh, with_sizes=True)
  report({'event': 'first', 'devices': int(mesh.size), **first})
  if budget is None or 'total' not in first or first['total'] <= budget:
    return
  start = REMAT_ORDER.index(cfg.model.remat) if cfg.model.remat in REMAT_ORDER else 0
  for remat in REMAT_ORDER[start:]:
    options = ([int(cfg.train.grad_accum)] if remat != cfg.model.remat else []) + \
        grad_accum_options(cfg, mesh)
    lo, hi, best = 0, len(options) - 1, None
    while lo <= hi:  # memory falls as grad_accum grows: bisect for the smallest that fits
      mid = (lo + hi) // 2
      trial = figures(_with(cfg, remat, options[mid]), mesh)
      fits = trial['total'] <= budget
      report({'event': 'trial', **trial})
      if fits:
        best, hi = trial, mid - 1
      else:
        lo = mid + 1
    if best is not None:
      report({'event': 'choice', **best})
      return
  report({'event': 'none'})


def run(cfg, devices: int, budget: float | None, report) -> None:
  """``search`` on ``devices`` devices: here if this host has them, else in a child process."""
  if devices <= jax.device_count():
    search(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:devices]), budget, report)
    return
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])}
  request = json.dumps({'config': cfg.to_dict(), 'devices': devices, 'budget': budget})
  proc = subprocess.Popen([sys.executable, '-m', 'jaxlm.plan'], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  proc.stdin.write(request)
  proc.stdin.close()
  for line in proc.stdout:
    if line.startswith(_EVENT):
      event = json.loads(line[len(_EVENT):])
      if event['event'] == 'error':
        proc.wait()
        raise ConfigError(event['message'])
      report(event)
  err = proc.stderr.read()
  if proc.wait():
    last = (err.strip().splitlines() or ['no output'])[-1]
    raise JaxlmError(f'the compile on {devices} fake CPU devices failed: {last}')


def _child() -> int:
  """Reads a request on stdin; runs ``search`` on this process's fake CPU devices."""
  request = json.loads(sys.stdin.read())
  cfg = ml_collections.ConfigDict(request['config'])
  cfg.lock()

  def report(event):
    print(_EVENT + json.dumps(event), flush=True)

  try:
    search(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:request['devices']]),
           request['budget'], report)
  except JaxlmError as e:
    report({'event': 'error', 'message': str(e)})
  return 0


if __name__ == '__main__':
  sys.exit(_child())
