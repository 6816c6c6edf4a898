"""Pipeline parallelism: the scanned layer stack run as stages inside one jitted step.

The stack of ``U`` scanned units (blocks, or MoE groups of ``moe_every`` blocks) is
viewed as ``[repeats, stages, per_stage, ...]``: unit ``u = (r * stages + s) * per_stage
+ k`` runs on stage ``s`` in pass ``r`` (the circular schedule; ``repeats=1`` is GPipe).
The parameters stay ``[U, ...]`` in memory and on disk (split over the ``pipeline``
mesh axis in contiguous blocks), so a checkpoint does not depend on the stage count;
the staged view is a reshape inside the step.

Each iteration every stage runs its ``per_stage`` units on one micro-batch at once (a
``vmap`` over the stage axis, sharded over ``pipeline``), then the outputs move one
stage on (``jnp.roll`` over that axis, which XLA lowers to a collective-permute).
Stage 0 takes a fresh micro-batch, or, on later passes, the last stage's output of
the same micro-batch, kept in a ``[microbatches, ...]`` buffer. Work item ``w`` (micro-
batch ``w % M`` in pass ``w // M``) is on stage ``s`` at iteration ``w + s``, so the
schedule takes ``M * repeats + stages - 1`` iterations; ``stages - 1`` of them per
stage are bubble. Autodiff of the loop gives the backward pipeline.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jaxlm.core.errors import ConfigError


def microbatches(model_cfg, stages: int) -> int:
  """Micro-batches per pipelined forward pass (``model.pipeline_microbatches``; 0 = stages)."""
  return int(model_cfg.pipeline_microbatches) or stages


def units(model_cfg) -> int:
  """Scanned units in the stack: blocks, or MoE groups when ``moe_every`` > 1."""
  grouped = model_cfg.moe_experts > 0 and model_cfg.moe_every > 1
  return model_cfg.n_layers // model_cfg.moe_every if grouped else model_cfg.n_layers


def bubble_fraction(stages: int, micro: int, repeats: int) -> float:
  """Share of each stage's iterations spent idle: (S - 1) / (M * R + S - 1)."""
  return (stages - 1) / (micro * repeats + stages - 1)


def check(model_cfg, stages: int, batch_rows: int, data_parallel: int) -> None:
  """ConfigError naming the field when this model cannot be pipelined over ``stages``.

  ``batch_rows``: sequences per forward pass (the train micro-batch or eval batch);
  each pipeline micro-batch must still split over the ``data_parallel`` devices.
  """
  if stages == 1:
    return
  m, r = model_cfg, int(model_cfg.pipeline_repeats)
  if not m.scan_layers:
    raise ConfigError(f'mesh.pipeline x mesh.dcn_pipeline = {stages} stages need '
                      'model.scan_layers=True (stages split the scanned layer stack)')
  u = units(m)
  what = f'model.n_layers={m.n_layers}' + (
      f' (/ model.moe_every={m.moe_every} = {u} groups)' if u != m.n_layers else '')
  if u % (stages * r):
    raise ConfigError(f'{what} is not divisible by {stages} pipeline stages x '
                      f'model.pipeline_repeats={r}')
  micro = microbatches(m, stages)
  if micro < stages:
    raise ConfigError(f'model.pipeline_microbatches={micro} must be >= the {stages} pipeline '
                      'stages (fewer leave stages idle for the whole step)')
  if batch_rows % micro or (batch_rows // micro) % data_parallel:
    raise ConfigError(f'{batch_rows} sequences per pass do not split into '
                      f'model.pipeline_microbatches={micro} micro-batches of a multiple of '
                      f'{data_parallel} data-parallel devices')


def schedule(stages: int, micro: int, repeats: int) -> np.ndarray:
  """Work item of every (iteration, stage): [iterations, stages] int, -1 = bubble.

  Work item ``w`` is micro-batch ``w % micro`` in pass ``w // micro``.
  """
  t = np.arange(micro * repeats + stages - 1)[:, None]
  w = t - np.arange(stages)[None, :]
  return np.where((w >= 0) & (w < micro * repeats), w, -1)


def rotate(h: jax.Array) -> jax.Array:
  """[stages, ...] -> stage s holds what stage s - 1 held (the last wraps to stage 0).

  Over the stage axis split on 'pipeline' this is XLA's collective-permute.
  """
  return jnp.roll(h, 1, axis=0)


def _stage_axes():
  """Mesh axes of the logical 'stage' axis under the active rules (None outside a mesh)."""
  axes = nn.logical_to_mesh_axes(('stage',))[0]
  return (axes,) if isinstance(axes, str) else axes


def run(unit_fn, params, x, aux, *, stages: int, micro: int, repeats: int):
  """The stack over ``x``, pipelined: ``unit_fn(unit_params, x, aux) -> (x, sown)``.

  params: the stacked unit parameters, every leaf ``[units, ...]``.
  x: [batch, length, embed]; aux: a pytree of ``[batch, ...]`` arrays (positions,
  masks) that goes with each row. Rows ``i, i + M, ...`` form micro-batch ``i``, so each
  data-parallel device keeps its own rows. Returns (x, sown): ``sown`` is the tree
  of ``unit_fn``'s per-unit outputs averaged over the micro-batches, ``[units, ...]``.
  """
  b = x.shape[0]
  per = jax.tree.leaves(params)[0].shape[0] // (stages * repeats)
  axes = _stage_axes()
  spec = lambda a, lead: P(*lead, *([P.UNCONSTRAINED] * (a.ndim - len(lead))))
  pin = lambda a, lead: jax.lax.with_sharding_constraint(a, spec(a, lead)) if axes else a

  # [units, ...] -> [stages, repeats, per_stage, ...], the stage axis split over 'pipeline'.
  def staged(a):
    a = jnp.swapaxes(a.reshape(repeats, stages, per, *a.shape[1:]), 0, 1)
    return pin(a, (axes, None, None))
  params = jax.tree.map(staged, params)

  split = lambda a: jnp.moveaxis(a.reshape(b // micro, micro, *a.shape[1:]), 1, 0)
  buf = split(x)  # [micro, batch / micro, length, embed]: inputs, then each pass's outputs
  aux = jax.tree.map(split, aux)
  work = jnp.asarray(schedule(stages, micro, repeats))
  first = jnp.arange(stages) == 0

  def stage(p, h, a, r):  # one stage: its units of pass r over micro-batch h
    p = jax.tree.map(lambda w: w[r], p)
    return jax.lax.scan(lambda h, pu: unit_fn(pu, h, a), h, p)

  staged_fn = jax.vmap(stage, spmd_axis_name=axes or None)

  def step(carry, w):  # w [stages]: the work item of each stage this iteration
    prev, buf = carry
    valid = w >= 0
    mb, rep = jnp.where(valid, w % micro, 0), jnp.clip(w // micro, 0, repeats - 1)
    # Stage s takes stage s-1's last output; stage 0 the buffered micro-batch.
    h = rotate(prev)
    h = jnp.where(first[:, None, None, None], buf[mb[0]][None], h)
    h = pin(h, (axes,))
    a = jax.tree.map(lambda v: v[mb], aux)
    out, sown = staged_fn(params, h, a, rep)
    last = stages - 1
    buf = buf.at[mb[last]].set(jnp.where(valid[last], out[last], buf[mb[last]]))
    # Sown values of pass r, stage s land on unit (r * stages + s) * per_stage + k.
    hit = (valid[:, None] & (rep[:, None] == jnp.arange(repeats)[None])).astype(jnp.float32)
    sown = jax.tree.map(lambda v: jnp.einsum('sr,sk...->rsk...', hit, v), sown)
    return (out, buf), sown

  zeros = jnp.zeros((stages, *buf.shape[1:]), buf.dtype)
  (_, buf), sown = jax.lax.scan(step, (zeros, buf), work)
  sown = jax.tree.map(lambda v: jnp.sum(v, 0).reshape(-1, *v.shape[4:]) / micro, sown)
  return jnp.moveaxis(buf, 0, 1).reshape(x.shape), sown
