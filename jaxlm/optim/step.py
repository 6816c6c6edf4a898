"""The pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

Batches are dicts of ``[batch, length]`` arrays: inputs, targets, segment_ids,
positions, loss_mask. Losses are summed over tokens and divided once by the
token count, so gradient accumulation gives the same update as one big batch.

Every step is guarded on device: a step whose loss, gradient norm or updated
parameters are not finite (or, with ``spike_factor``, whose loss spikes) keeps
the old params and optimizer state and is counted in the state, so the loop
learns about it without a host sync per step.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxlm.core.tree import all_finite
from jaxlm.model.loss import model_losses, sequence_losses


# Running mean of accepted losses for the spike guard: ~100 steps of memory.
LOSS_AVG_DECAY = 0.99


class TrainState(struct.PyTreeNode):
  step: jax.Array  # steps taken, skipped ones included (the data position)
  params: Any
  opt_state: Any
  skipped_steps: jax.Array  # int32: steps whose update was dropped, in total (survives resume)
  bad_steps: jax.Array  # int32: consecutive dropped steps up to now (0 after a good step)
  loss_avg: jax.Array  # float32: running mean of accepted losses (0 before the first)


def new_state(params, opt_state, step=0) -> TrainState:
  """A TrainState at ``step`` with clean guard counters."""
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state,
                    skipped_steps=jnp.zeros((), jnp.int32), bad_steps=jnp.zeros((), jnp.int32),
                    loss_avg=jnp.zeros((), jnp.float32))


def loss_sums(model, params, batch, z_loss: float = 0.0):
  """(sum of masked token losses, number of target tokens); logits built a chunk at a time."""
  return (jnp.sum(sequence_losses(model, params, batch, z_loss)),
          jnp.sum(batch['loss_mask'].astype(jnp.float32)))


def moe_metrics(intermediates) -> dict:
  """Router losses (mean over MoE layers) and expert load extremes from the sown values.

  Load is each expert's share of token copies times the expert count, per
  layer: 1.0 everywhere is perfect balance; max/min show the worst layer's spread.
  """
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    found.setdefault(name, []).append(leaf)
  # Scanned layers sow arrays stacked on [layers]; unscanned ones sow one per layer.
  scalars = lambda name: jnp.concatenate([jnp.reshape(a, (-1,)) for a in found[name]])
  load = jnp.concatenate([jnp.reshape(a, (-1, a.shape[-1])) for a in found['moe_load']])
  return {'moe_aux_loss': jnp.mean(scalars('moe_aux_loss')),
          'moe_router_z_loss': jnp.mean(scalars('moe_router_z_loss')),
          'moe_load_max': jnp.max(load), 'moe_load_min': jnp.min(load)}


def objective_sums(model, params, batch, z_loss: float = 0.0):
  """(objective sum to differentiate, (token count, extra metric sums)).

  Dense models: the objective is the token-loss sum and there are no extras.
  MoE models add the router losses with their config weights, scaled by the
  token count so that dividing by the count (as for the token losses) leaves
  ``weight * loss``; their extras are the plain cross-entropy sum and the MoE
  metrics, each times the count.
  """
  c = model.cfg
  if not c.moe_experts:
    total, count = loss_sums(model, params, batch, z_loss)
    return total, (count, {})
  # sequence_losses, keeping the router losses the MoE layers sow on the way.
  (x, _), state = model.apply({'params': params}, batch['inputs'], batch['positions'],
                              batch['segment_ids'], method='features', mutable=['intermediates'])
  count = jnp.sum(batch['loss_mask'].astype(jnp.float32))
  ce = jnp.sum(model_losses(model, params, x, batch['targets'], batch['loss_mask'], z_loss))
  moe = moe_metrics(state['intermediates'])
  router = (c.moe_aux_loss_weight * moe['moe_aux_loss']
            + c.moe_z_loss_weight * moe['moe_router_z_loss'])
  extras = {'ce': ce, **{k: v * count for k, v in moe.items()}}
  return ce + router * count, (count, extras)


def make_train_step(model, tx: optax.GradientTransformation, lr_schedule, grad_accum: int = 1,
                    z_loss: float = 0.0, spike_factor: float = 0.0):
  """Builds the pure train step; the caller jits it with shardings.

  ``spike_factor`` > 0 also drops a step whose loss is above ``spike_factor``
  times the running mean of accepted losses (off by default).
  """

  def grads_of(params, batch):
    (total, (count, extras)), grads = jax.value_and_grad(
        lambda p: objective_sums(model, p, batch, z_loss), has_aux=True)(params)
    return total, count, extras, grads

  def train_step(state: TrainState, batch):
    if grad_accum == 1:
      total, count, extras, grads = grads_of(state.params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

      def body(carry, mb):
        t, c, e, g = grads_of(state.params, mb)
        return jax.tree.map(jnp.add, carry, (t, c, e, g)), None

      first = jax.tree.map(lambda x: x[0], micro)
      extras0 = jax.eval_shape(lambda: grads_of(state.params, first))[2]  # {} for dense models
      zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, extras0),
              jax.tree.map(jnp.zeros_like, state.params))
      (total, count, extras, grads), _ = jax.lax.scan(body, zero, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    # 'loss' stays the token loss; MoE router losses are reported on their own.
    loss, grad_norm = extras.pop('ce', total) / denom, optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The new params are checked too: a huge lr overflows them from finite gradients.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)
    if spike_factor > 0:
      ok &= ~((state.loss_avg > 0) & (loss > spike_factor * state.loss_avg))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    avg = jnp.where(state.loss_avg > 0,
                    LOSS_AVG_DECAY * state.loss_avg + (1 - LOSS_AVG_DECAY) * loss, loss)
    skipped = state.skipped_steps + (~ok).astype(jnp.int32)
    bad = jnp.where(ok, 0, state.bad_steps + 1)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'tokens': count,
               # The lr this update used: the schedule counts applied updates only.
               'lr': lr_schedule(state.step - state.skipped_steps),
               'skipped_steps': skipped, 'bad_steps': bad,
               **{k: v / denom for k, v in extras.items()}}
    return state.replace(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state), skipped_steps=skipped,
                         bad_steps=bad, loss_avg=jnp.where(ok, avg, state.loss_avg)), metrics

  return train_step


def make_eval_step(model, micro_batches: int = 1):
  """eval_step(params, batch) -> (loss sum, token count); no z-loss.

  With ``micro_batches`` > 1 the batch runs as that many slices in sequence (a
  scan), so eval holds one train-sized micro-batch of activations at a time.
  Slice i takes rows i, i + n, ...: each device keeps its own rows.
  """
  def eval_step(params, batch):
    if micro_batches == 1:
      return loss_sums(model, params, batch)
    micro = jax.tree.map(lambda x: jnp.moveaxis(
        x.reshape(-1, micro_batches, *x.shape[1:]), 1, 0), batch)

    def body(carry, mb):
      return jax.tree.map(jnp.add, carry, loss_sums(model, params, mb)), None

    out, _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), micro)
    return out
  return eval_step
