"""The platform a step is built for, and every choice jaxlm makes from it.

A step is built for the devices of its mesh, not for the process's default
backend: ``jaxlm plan --target=v5p-512`` builds TPU steps on a CPU-only host
(compile-only TPU devices), and a CPU host's fake devices build CPU steps.
While a step is traced, the mesh set by ``sharding.activate`` (``jax.set_mesh``)
carries its devices' platform; ``building`` names it where no mesh is set
(init, which runs outside the mesh). Only when neither is there (a bare
``model.apply`` in a notebook) is it the process's first device.

The choices: which attention kernels compile natively (``kernel_mode``),
whether ``Dense`` takes its XLA:CPU-tuned backward (``cpu_tuned``) and the
compiler options of the steps and of init. ``accelerator_path`` builds CPU
steps as GPUs and TPUs build theirs, so CPU tests check the backward that
accelerators run.
"""

import contextlib
import contextvars
import os

import jax

from jaxlm.core.config import LIBRARY_KERNELS

CPU, GPU, TPU = 'cpu', 'gpu', 'tpu'
PLATFORMS = (CPU, GPU, TPU)

INTERPRET_ENV = 'JAXLM_PALLAS_INTERPRET'  # '1': Pallas kernels off their platform run interpreted

_building: contextvars.ContextVar[str | None] = contextvars.ContextVar('jaxlm_building', default=None)
_generic: contextvars.ContextVar[bool] = contextvars.ContextVar('jaxlm_generic', default=False)


def normal(name: str) -> str:
  """jax's platform names ('cuda', 'rocm', 'gpu', 'tpu', 'cpu') as jaxlm's three."""
  name = name.lower()
  return GPU if name in ('cuda', 'rocm', 'gpu') else name


def of_devices(devices) -> str:
  """Platform of a list of devices (real or compile-only); they must all share it."""
  names = {normal(d.platform) for d in devices}
  if len(names) != 1:
    raise ValueError(f'a mesh mixes platforms: {sorted(names)}')
  return names.pop()


def of_mesh(mesh) -> str:
  """Platform of a ``Mesh``'s devices; of an ``AbstractMesh``, the device it names (if any)."""
  if isinstance(mesh, jax.sharding.AbstractMesh):
    device = mesh.abstract_device
    return normal(device.platform if device is not None else jax.devices()[0].platform)
  return of_devices(mesh.devices.flat)


@contextlib.contextmanager
def building(platform: str):
  """Steps traced inside are built for ``platform`` when no mesh says otherwise."""
  token = _building.set(normal(platform))
  try:
    yield
  finally:
    _building.reset(token)


@contextlib.contextmanager
def accelerator_path():
  """CPU steps traced inside take the code GPUs and TPUs run (tests): no CPU-only
  ``Dense`` backward, no XLA:CPU options."""
  token = _generic.set(True)
  try:
    yield
  finally:
    _generic.reset(token)


def current() -> str:
  """The platform the step being traced is built for."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and getattr(mesh, 'abstract_device', None) is not None:
    return normal(mesh.abstract_device.platform)
  return _building.get() or normal(jax.devices()[0].platform)


def cpu_tuned(platform: str | None = None) -> bool:
  """Whether XLA:CPU-specific code and options apply (a CPU step outside ``accelerator_path``)."""
  return (platform or current()) == CPU and not _generic.get()


def kernel_mode(impl: str, platform: str | None = None) -> str | None:
  """How library kernel ``impl`` runs in a step for ``platform``: 'native', 'interpret'
  (Pallas interpreter, off its platform, when JAXLM_PALLAS_INTERPRET=1) or None (it cannot)."""
  if (platform or current()) == LIBRARY_KERNELS[impl]:
    return 'native'
  if impl != 'cudnn' and os.environ.get(INTERPRET_ENV) == '1':
    return 'interpret'
  return None


def step_compiler_options(platform: str) -> dict:
  """XLA options for the compiled train and eval steps ({} off CPU).

  XLA:CPU hands both dots and reductions to YNNPACK by default. The small
  reductions of a training step (norm statistics, softmax sums, bias-like
  gradient sums over [batch * length] rows) ran slower as YNNPACK calls than
  as XLA's own reduce kernels: at nanoGPT's CPU shape, dots-only took ~14%
  off the step's process CPU time (bench/RESULTS.md, issue 19). Dots stay
  in YNNPACK. Per-jit options override the same flag in XLA_FLAGS.

  XLA:CPU's TreeReductionRewriter splits every reduction over 32 or more
  elements into a reduce-window of 32-element partial sums and a reduce of
  those: at nanoGPT's shape 141 extra kernels (913 -> 576 fusions), ~5% of the
  step's CPU time. Off, XLA's reduce kernels sum straight through (in vector
  lanes); the results differ by float rounding only.
  """
  if not cpu_tuned(platform):
    return {}
  return {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_DOT',
          'xla_disable_hlo_passes': 'tree_reduction_rewriter'}


def init_compiler_options(platform: str) -> dict:
  """XLA options for the compiled init ({} off CPU).

  Init runs once, yet on CPU its per-parameter RNG kernels take XLA longer to
  compile than the train step (3.3 s vs 2.3 s at shakespeare_char's size);
  without backend optimisation it compiles in half the time.
  """
  return {'xla_backend_optimization_level': 0} if cpu_tuned(platform) else {}
