"""The pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

Batches are dicts of ``[batch, length]`` arrays: inputs, targets, segment_ids,
positions, loss_mask. Losses are summed over tokens and divided once by the
token count, so gradient accumulation gives the same update as one big batch.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def token_losses(logits, targets, z_loss: float = 0.0):
  """Next-token cross entropy per position. logits [batch, length, vocab] fp32."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss = lse - target_logit
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  return loss


def loss_sums(model, params, batch, z_loss: float = 0.0):
  """(sum of masked token losses, number of target tokens)."""
  logits = model.apply({'params': params}, batch['inputs'], batch['positions'],
                       batch['segment_ids'])
  mask = batch['loss_mask'].astype(jnp.float32)
  return jnp.sum(token_losses(logits, batch['targets'], z_loss) * mask), jnp.sum(mask)


def make_train_step(model, tx: optax.GradientTransformation, lr_schedule, grad_accum: int = 1,
                    z_loss: float = 0.0):
  """Builds the pure train step; the caller jits it with shardings."""

  def grads_of(params, batch):
    (total, count), grads = jax.value_and_grad(
        lambda p: loss_sums(model, p, batch, z_loss), has_aux=True)(params)
    return total, count, grads

  def train_step(state: TrainState, batch):
    if grad_accum == 1:
      total, count, grads = grads_of(state.params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

      def body(carry, mb):
        t, c, g = grads_of(state.params, mb)
        return jax.tree.map(jnp.add, carry, (t, c, g)), None

      zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (total, count, grads), _ = jax.lax.scan(body, zero, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': total / denom, 'grad_norm': optax.tree.norm(grads),
               'lr': lr_schedule(state.step), 'tokens': count}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model):
  """eval_step(params, batch) -> (loss sum, token count); no z-loss."""
  def eval_step(params, batch):
    return loss_sums(model, params, batch)
  return eval_step
