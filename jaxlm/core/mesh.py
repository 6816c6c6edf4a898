"""Builds the device mesh from the config's ``mesh`` section.

A single CPU is a 1x1x1x1x1x1 mesh: every code path is the same on 1 device and
on a pod. ICI axes (``pipeline, data, fsdp, expert, tensor, sequence``) lay out devices
inside a slice; DCN axes (``dcn_pipeline, dcn_data, dcn_fsdp``) repeat that layout
across slices or hosts, and are folded into ``pipeline``, ``data`` and ``fsdp`` of the
final mesh.
"""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxlm.core.errors import ConfigError
from jaxlm.core.sharding import MESH_AXES

# Each DCN axis and the ICI axis it multiplies in the final mesh.
DCN_AXES = {'dcn_pipeline': 'pipeline', 'dcn_data': 'data', 'dcn_fsdp': 'fsdp'}


def _resolve(sizes: dict[str, int], total: int, what: str) -> list[int]:
  """Fills in the single -1 entry so the product equals ``total``."""
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ConfigError(f'only one {what} axis may be -1, got {", ".join(free)}')
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise ConfigError(f'{k}={v} must be a positive size or -1')
  known = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if total % known:
      raise ConfigError(
          f'{what} axes {_fmt(sizes)} cannot fill {total} devices '
          f'({total} is not divisible by {known})')
    sizes = {**sizes, free[0]: total // known}
  if math.prod(sizes.values()) != total:
    raise ConfigError(
        f'{what} axes {_fmt(sizes)} multiply to {math.prod(sizes.values())} '
        f'but there are {total} devices')
  return [sizes[k] for k in sizes]


def _fmt(sizes: dict[str, int]) -> str:
  return ','.join(f'mesh.{k}={v}' for k, v in sizes.items())


def mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1):
  """Returns (ici_shape, dcn_shape), each over MESH_AXES."""
  dcn = dict(zip(DCN_AXES, _resolve({k: int(mesh_cfg[k]) for k in DCN_AXES}, num_slices, 'DCN')))
  over = {v: dcn[k] for k, v in DCN_AXES.items()}
  dcn_shape = [over.get(a, 1) for a in MESH_AXES]
  per_slice = num_devices // num_slices
  ici = {k: int(mesh_cfg[k]) for k in MESH_AXES}
  return _resolve(ici, per_slice, 'mesh'), dcn_shape


def _num_slices(devices) -> int:
  return len({getattr(d, 'slice_index', 0) for d in devices})


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A ``Mesh`` with axes MESH_AXES, respecting the physical topology."""
  devices = list(devices if devices is not None else jax.devices())
  slices = _num_slices(devices)
  dcn_requested = math.prod(int(mesh_cfg[k]) for k in DCN_AXES)
  if slices == 1 and dcn_requested not in (1, -1):
    # No slice boundaries (CPU, one GPU host): DCN axes are ordinary axes
    # over processes, so fold them into the ICI shape.
    slices_for_shape = 1
    ici, _ = mesh_shape(_fold_dcn(mesh_cfg), len(devices))
    dcn = None
  else:
    slices_for_shape = slices
    ici, dcn = mesh_shape(mesh_cfg, len(devices), slices_for_shape)
  try:
    if slices_for_shape > 1:
      arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices,
                                                 allow_split_physical_axes=True)
    else:
      arr = mesh_utils.create_device_mesh(ici, devices=devices,
                                          allow_split_physical_axes=True)
  except (AssertionError, ValueError, NotImplementedError):
    # Topology-aware placement is unavailable for some device kinds
    # (fake CPU devices, mixed hosts); fall back to process-major order.
    # With slices, each DCN factor is the outer part of its axis, as in a hybrid mesh.
    shape = [i * d for i, d in zip(ici, dcn)] if slices_for_shape > 1 else ici
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


class _Folded(dict):
  __getattr__ = dict.__getitem__


def _fold_dcn(mesh_cfg):
  out = _Folded({k: int(mesh_cfg[k]) for k in MESH_AXES})
  for dcn_key, ici_key in DCN_AXES.items():
    n = int(mesh_cfg[dcn_key])
    if n > 1:
      if out[ici_key] == -1:
        continue  # -1 already absorbs whatever is left
      out[ici_key] *= n
  out.update(dict.fromkeys(DCN_AXES, 1))
  return out


def data_parallel_size(mesh: Mesh) -> int:
  """Number of ways the batch is split (data x fsdp x expert)."""
  return mesh.shape['data'] * mesh.shape['fsdp'] * mesh.shape.get('expert', 1)


def pipeline_stages(mesh: Mesh) -> int:
  """Pipeline stages the layer stack is split into (mesh.pipeline x mesh.dcn_pipeline)."""
  return mesh.shape.get('pipeline', 1)


def fit_to_host(cfg) -> Mesh:
  """The config's mesh if it fits these devices, else all data-parallel (cfg.mesh updated).

  For commands that restore a run trained elsewhere (eval, generate, convert):
  checkpoints reshard onto any mesh, so a device-count mismatch is not an error.
  """
  try:
    return make_mesh(cfg.mesh)
  except ConfigError:
    with cfg.unlocked():
      for k in ('pipeline', 'fsdp', 'expert', 'tensor', 'sequence', *DCN_AXES):
        cfg.mesh[k] = 1
      cfg.mesh.data = -1
    return make_mesh(cfg.mesh)
