"""`jaxlm plan`: compile the real train step for a mesh of any size and check that it fits.

The figures are the compiler's memory analysis of the compiled step, per
device: arguments (params, optimizer state, batch), temporaries (activations
and workspace) and outputs not aliased to donated arguments; and the step's
collective traffic per device (``jaxlm.cli.collectives``).

Which compiler: with ``--target`` naming hardware (``jaxlm.cli.targets``) and that
hardware's compiler installed (libtpu, the CUDA PJRT plugin), the step
compiles in a child process for compile-only devices of the target, on any
machine: the target's own buffer assignment. Without it, or with no target,
a mesh larger than this host compiles in a child that sees that many fake CPU
devices (``--xla_force_host_platform_device_count``): XLA:CPU's figure, which
indicates but does not equal the accelerator's, and is labelled so. Compile
only: nothing is allocated.

When the step does not fit the target, ``search`` compiles it again with more
gradient-accumulation micro-batches (and, if that is not enough, heavier remat)
to find the smallest ``train.grad_accum`` that fits.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile

import jax
import ml_collections
import numpy as np

from jaxlm.cli import collectives
from jaxlm.cli import targets
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import platform
from jaxlm.core.errors import ConfigError, JaxlmError
from jaxlm.model import pipeline

GiB = 2**30

# Share of HBM the step may use: the rest is for the runtime and fragmentation.
# (On GPU, JAX preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says more.)
USABLE = 0.9

# Remat policies from most memory (least recompute) to least.
REMAT_ORDER = ('none', 'dots', 'minimal', 'full')

_EVENT = 'JAXLM-PLAN '  # prefix of the child's JSON lines on stdout


def target_budget(target: str, devices: int = 0, slices: int = 1
                  ) -> tuple[str, float | None, targets.Target | None]:
  """(description, usable bytes per device, hardware) for a --target value: a hardware
  name (``jaxlm.cli.targets``) or a number of GiB per device (no hardware).

  '' means the local accelerator (its allocator's limit); None bytes when
  there is none (a CPU host: figures only).
  """
  if target:
    try:
      gib = float(target)
    except ValueError:
      hw = targets.parse(target, devices, slices)
      return f'{hw.name}: {hw.hbm / GiB:.1f} GiB HBM each', hw.hbm * USABLE, hw
    return f'{gib:g} GiB per device', gib * GiB * USABLE, None
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != 'cpu' else None
  if not stats or 'bytes_limit' not in stats:
    return 'none (no accelerator here; pass --target)', None, None
  return f"local {dev.device_kind}: {stats['bytes_limit'] / GiB:.1f} GiB usable", float(
      stats['bytes_limit']), None


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
  """The compiler's per-device bytes and collective bytes for the config's train step on
  ``mesh`` (compiles it); with ``with_sizes`` also the parameter count and
  params/optimizer-state bytes."""
  from jaxlm.engine.build import Setup  # noqa: PLC0415  (engine imports the train step)
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


def compiler_label(mesh, target: targets.Target | None = None) -> str:
  """The compiler a step on ``mesh`` compiles with, as plan prints it."""
  name = platform.of_mesh(mesh)
  if name == platform.CPU:
    return 'XLA:CPU'
  if target is not None and target.platform == name:
    return targets.compiler_name(target)
  return f'{name.upper()} compiler ({mesh.devices.flat[0].device_kind})'


def search(cfg, mesh, budget: float | None, report, target=None) -> None:
  """Compiles the configured step, then (if it exceeds ``budget`` bytes) finds the
  smallest grad_accum that fits, trying heavier remat if needed. ``report(event)``
  receives each result as a dict: 'first' (with sizes and the compiler's name),
  'trial's, then 'choice' or 'none'."""
  first = figures(cfg, mesh, with_sizes=True)
  report({'event': 'first', 'devices': int(mesh.size),
          'compiler': compiler_label(mesh, target), **first})
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


def uses_target_compiler(target: targets.Target | None) -> bool:
  """Whether ``run`` compiles for the target's own devices (its compiler is installed)."""
  return target is not None and targets.compiler_version(target.platform) is not None


def run(cfg, devices: int, budget: float | None, report, target=None) -> None:
  """``search`` on ``devices`` devices: for the target's compile-only devices when its
  compiler is installed, else here if this host has the devices, else on fake CPU devices;
  both of the latter in a child process."""
  native = uses_target_compiler(target)
  if not native and devices <= jax.device_count():
    search(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:devices]), budget, report)
    return
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  count = 1 if native else devices
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': ' '.join(flags + [f'--xla_force_host_platform_device_count={count}'])}
  if native:  # compile only, no chip: libtpu's one-process-per-host lock has nothing to guard
    env.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  request = json.dumps({'config': cfg.to_dict(), 'devices': devices, 'budget': budget,
                        'target': dataclasses.asdict(target) if native else None})
  # The compilers log to stderr (libtpu at length): a file, so a full pipe never stalls them.
  with tempfile.TemporaryFile('w+') as err:
    proc = subprocess.Popen([sys.executable, '-m', 'jaxlm.cli.plan'], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    proc.stdin.write(request)
    proc.stdin.close()
    for line in proc.stdout:
      if line.startswith(_EVENT):
        event = json.loads(line[len(_EVENT):])
        if event['event'] == 'error':
          proc.wait()
          raise ConfigError(event['message'])
        report(event)
    if proc.wait():
      err.seek(0)
      last = (err.read().strip().splitlines() or ['no output'])[-1]
      where = target.name if native else f'{devices} fake CPU devices'
      raise JaxlmError(f'the compile for {where} failed: {last}')


def _child() -> int:
  """Reads a request on stdin; runs ``search`` on the target's compile-only devices or on
  this process's fake CPU devices."""
  request = json.loads(sys.stdin.read())
  cfg = ml_collections.ConfigDict(request['config'])
  cfg.lock()

  def report(event):
    print(_EVENT + json.dumps(event), flush=True)

  target = targets.Target(**request['target']) if request['target'] else None
  if target is not None and target.platform == 'gpu' and cfg.model.attention == 'cudnn':
    # jax's cuDNN attention asks the local device for its compute capability (as of jax
    # 0.10), so it cannot compile for compile-only GPUs.
    stand_in = 'chunked' if cfg.model.sliding_window else 'pallas_gpu'
    report({'event': 'note', 'message': "cuDNN attention needs a local GPU to compile: planned "
            f"as '{stand_in}', also a flash kernel (no [length, length] scores)"})
    cfg.model.attention = stand_in
  try:
    devices = (targets.compile_only_devices(target) if target else
               jax.devices()[:request['devices']])
    search(cfg, mesh_lib.make_mesh(cfg.mesh, devices), request['budget'], report, target)
  except JaxlmError as e:
    report({'event': 'error', 'message': str(e)})
  return 0


if __name__ == '__main__':
  sys.exit(_child())
