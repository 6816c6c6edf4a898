"""Hardware a step can be compiled for without it: names, sizes, compile-only devices.

TPU targets use Cloud TPU's names: ``v5p-N`` counts TensorCores (two per
chip, so v5p-512 is 256 chips), ``v5e-N`` and ``v6e-N`` count chips; with
``slices`` > 1 that many such slices talk over DCN. libtpu's compiler gives
compile-only devices for the topology (``jax.experimental.topologies``).

NVIDIA targets (``a100-80g``, ``h100-80g``, ``h200``, ``b200``) are hosts of
up to 8 GPUs: ``devices`` GPUs are ``devices // 8`` hosts of 8 (or one host of
fewer). XLA's GPU compiler builds for the device description shipped here as
``<name>.txtpb`` (a GpuTargetConfigProto, from XLA's published specs), through
the CUDA PJRT plugin, with no GPU and ``JAX_PLATFORMS=cpu``.

When the target's compiler is not installed the caller falls back to XLA:CPU
on fake CPU devices; ``missing`` says so and how to install it.
"""

import dataclasses
import importlib.metadata
import importlib.util
import math
from pathlib import Path

from jaxlm.core.errors import ConfigError

GiB = 2**30
MiB = 2**20
GPUS_PER_HOST = 8

# HBM per device as the driver reports it (nvidia-smi; Cloud TPU docs). B200: its spec's size.
HBM = {
    'a100-80g': 81920 * MiB,
    'h100-80g': 81559 * MiB,
    'h200': 143771 * MiB,
    'b200': 191514411008,
    'v5e': 16 * GiB,
    'v5p': 95 * GiB,
    'v6e': 32 * GiB,
}
GPU_KINDS = ('a100-80g', 'h100-80g', 'h200', 'b200')
TPU_KINDS = ('v5e', 'v5p', 'v6e')
EXTRA = {'tpu': 'aot-tpu', 'gpu': 'aot-gpu'}  # pip extra that installs each compiler


@dataclasses.dataclass(frozen=True)
class Target:
  """One compile target: ``kind`` ('v5p', 'h100-80g', ...), ``devices`` in all."""
  kind: str
  devices: int
  slices: int = 1

  @property
  def platform(self) -> str:
    return 'tpu' if self.kind in TPU_KINDS else 'gpu'

  @property
  def hbm(self) -> int:
    return HBM[self.kind]

  @property
  def name(self) -> str:
    """Cloud TPU's name of one slice (v5p-512) or the GPU count (8 x h100-80g)."""
    if self.platform == 'gpu':
      return f'{self.devices} x {self.kind}'
    per_slice = self.devices // self.slices
    n = 2 * per_slice if self.kind == 'v5p' else per_slice
    return f'{self.kind}-{n}' + (f' x {self.slices} slices' if self.slices > 1 else '')

  @property
  def topology(self) -> str:
    """libtpu's topology name of one slice ('v5p:4x8x8'), or GPUs as slices x hosts x per host."""
    per_slice = self.devices // self.slices
    if self.platform == 'gpu':
      per_host = min(per_slice, GPUS_PER_HOST)
      return f'1x{per_slice // per_host}x{per_host}'
    dims = _tpu_dims(per_slice, 3 if self.kind == 'v5p' else 2)
    return f"{self.kind}:{'x'.join(map(str, dims))}"


def _tpu_dims(chips: int, rank: int) -> list[int]:
  """Chips as Cloud TPU lays out a slice: powers of two, as even as possible, smallest first
  (v5p: 4 chips 2x2x1, 8 2x2x2, 256 4x8x8; v5e/v6e: 8 chips 2x4, 256 16x16)."""
  dims = [1] * rank
  for _ in range(int(math.log2(chips))):
    dims[dims.index(min(dims))] *= 2
  dims.sort()
  if rank == 3 and dims[0] == 1:
    dims = dims[1:] + [1]  # Cloud TPU writes the flat axis last: 2x2x1
  return dims


def sized(text: str) -> bool:
  """Whether a --target value names its own device count (a TPU slice: 'v5p-512')."""
  kind, _, size = text.rpartition('-')
  return kind in TPU_KINDS and size.isdigit()


def parse(text: str, devices: int = 0, slices: int = 1) -> Target:
  """A --target value ('v5p-512', 'v5e-8', 'h100-80g', 'v5p' with ``devices``) as a Target."""
  kind, _, size = text.rpartition('-') if text.startswith('v') else (text, '', '')
  if text.startswith('v') and not kind:
    kind, size = text, ''
  if kind in TPU_KINDS:
    if size:
      if not size.isdigit():
        raise ConfigError(f"--target='{text}': the size after '{kind}-' must be a number")
      chips = int(size) // (2 if kind == 'v5p' else 1)
      if devices and devices != chips * slices:
        raise ConfigError(f'--target={text} is {chips * slices} chips but --devices={devices}')
      devices = chips * slices
    if not devices:
      raise ConfigError(f"--target='{text}' needs a size (e.g. {kind}-8) or --devices")
    per_slice = devices // max(slices, 1)
    if slices < 1 or devices % slices or per_slice & (per_slice - 1):
      raise ConfigError(f'--target={text}: {devices} chips in {slices} slices is not a '
                        'power-of-two slice')
    return Target(kind, devices, slices)
  if text in GPU_KINDS:
    devices = devices or GPUS_PER_HOST
    if devices > GPUS_PER_HOST and devices % GPUS_PER_HOST:
      raise ConfigError(f'--devices={devices} {text} is not whole hosts of {GPUS_PER_HOST} GPUs')
    if slices != 1:
      raise ConfigError(f'--slices is for TPU targets; {text} hosts are set by --devices')
    return Target(text, devices)
  names = ', '.join([f'{k}-N' for k in TPU_KINDS] + list(GPU_KINDS))
  raise ConfigError(f"--target='{text}' is not one of {names} or a number of GiB")


def compiler_version(platform: str) -> str | None:
  """Version of the installed compiler for ``platform`` (libtpu, the CUDA PJRT plugin), or None."""
  dist, module = (('libtpu', 'libtpu') if platform == 'tpu' else
                  ('jax-cuda12-pjrt', 'jax_plugins.xla_cuda12'))
  try:
    if importlib.util.find_spec(module) is None:
      return None
  except ModuleNotFoundError:
    return None
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return 'unknown version'


def compiler_name(target: Target) -> str:
  """'TPU compiler, libtpu 0.0.42.1, v5p-512' or 'XLA:GPU (CUDA plugin 0.10.2), 8 x h100-80g'."""
  version = compiler_version(target.platform)
  if target.platform == 'tpu':
    return f'TPU compiler, libtpu {version}, {target.name}'
  return f'XLA:GPU compiler, jax-cuda12-pjrt {version}, {target.name}'


def missing(target: Target) -> str | None:
  """One line naming the missing compiler and how to install it, or None when it is here."""
  if compiler_version(target.platform) is not None:
    return None
  what = 'TPU compiler (libtpu)' if target.platform == 'tpu' else 'NVIDIA compiler (CUDA plugin)'
  return (f"XLA:CPU stand-in: the {what} is not installed; `pip install "
          f"'jaxlm[{EXTRA[target.platform]}]'` for {target.name}'s own figure")


def gpu_config_text(kind: str) -> str:
  return (Path(__file__).parent / f"{kind.replace('-', '_')}.txtpb").read_text()


def compile_only_devices(target: Target) -> list:
  """The target's devices as jax compile-only devices (needs the target's compiler)."""
  from jax.experimental import topologies  # noqa: PLC0415
  if target.platform == 'tpu':
    kw = {'num_slices': target.slices} if target.slices > 1 else {}
    return list(topologies.get_topology_desc(topology_name=target.topology, platform='tpu',
                                             **kw).devices)
  return list(topologies.get_topology_desc(topology_name='', platform='cuda',
                                           target_config=gpu_config_text(target.kind),
                                           topology=target.topology).devices)
