"""Next-token cross entropy from hidden states, a chunk of positions at a time.

At Llama 3's 128,256-token vocabulary the fp32 logits of one 8192-token
sequence take 4.2 GB, and autodiff keeps their gradient too. Here the LM head
runs on one chunk of ``model.loss_chunk`` positions at a time inside a
rematerialized scan: the forward pass keeps each chunk's loss, the backward pass
recomputes that chunk's logits, so at most one chunk's ``[batch, chunk, vocab]``
logits (and gradient) exist at once. Training, eval and multiple-choice scoring
all use ``sequence_losses``.
"""

import functools

import jax
import jax.numpy as jnp

from jaxlm.sharding import constrain


def token_losses(logits, targets, z_loss: float = 0.0):
  """Cross entropy per position, plus ``z_loss * logsumexp**2``.

  logits [..., vocab] fp32, targets [...] int -> [...] fp32.
  """
  lse = jax.nn.logsumexp(logits, axis=-1)
  # A one-hot product rather than a gather: with the vocab split over 'tensor',
  # each shard reduces its own slice and XLA adds the partial sums, where a
  # gather would first all-gather the logits. The sum is exact (one nonzero).
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
  loss = lse - jnp.sum(logits * one_hot, axis=-1)
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  return loss


def num_chunks(length: int, chunk: int) -> int:
  """The fewest chunks with at most ``chunk`` positions each that divide ``length``."""
  if chunk <= 0 or chunk >= length:
    return 1
  return next(n for n in range(-(-length // chunk), length + 1) if length % n == 0)


def _row_sums(head, x, targets, mask, z_loss: float, count_misses: bool):
  logits = head(x)
  losses = jnp.sum(token_losses(logits, targets, z_loss) * mask, axis=-1)
  if not count_misses:
    return losses
  misses = (jnp.argmax(logits, axis=-1) != targets).astype(jnp.float32) * mask
  return losses, jnp.sum(misses, axis=-1)


def chunked_losses(head, x, targets, mask, z_loss: float = 0.0, chunk: int = 0,
                   count_misses: bool = False):
  """Summed masked token losses per sequence, building logits a chunk at a time.

  head: hidden [batch, c, embed] -> fp32 logits [batch, c, vocab].
  x [batch, length, embed]; targets, mask [batch, length] -> [batch] fp32.
  With ``count_misses``: (losses, misses), misses [batch] counting the masked
  positions whose target is not the argmax (0: greedy decoding gives the row).
  """
  b, t = targets.shape
  mask = mask.astype(jnp.float32)
  n = num_chunks(t, chunk)
  if n == 1:
    return _row_sums(head, x, targets, mask, z_loss, count_misses)

  # Chunk k holds positions k, k + n, k + 2n, ...: strided, so when the length
  # is split over 'sequence' every device holds an equal share of every chunk
  # (contiguous chunks would put each chunk on one device and idle the rest).
  def split(a):  # [batch, length, ...] -> [n, batch, length / n, ...]
    return jnp.moveaxis(a.reshape(b, t // n, n, *a.shape[2:]), 2, 0)

  # Remat: the backward pass recomputes a chunk's logits instead of keeping them.
  @functools.partial(jax.checkpoint, prevent_cse=False)  # inside scan: no CSE across steps
  def body(total, xs):
    xc, tc, mc = xs
    xc = constrain(xc, ('act_batch', 'act_length', 'act_embed'))
    return jax.tree.map(jnp.add, total, _row_sums(head, xc, tc, mc, z_loss, count_misses)), None

  zero = jnp.zeros((b,), jnp.float32)
  total, _ = jax.lax.scan(body, (zero, zero) if count_misses else zero,
                          (split(x), split(targets), split(mask)))
  return total


def sequence_losses(model, params, batch, z_loss: float = 0.0, count_misses: bool = False):
  """Summed masked next-token losses per sequence, ``[batch]`` fp32.

  batch: dict of [batch, length] arrays (inputs, targets, positions,
  segment_ids, loss_mask). Chunked by ``model.cfg.loss_chunk``; see
  ``chunked_losses`` for ``count_misses``.
  """
  x, _ = model.apply({'params': params}, batch['inputs'], batch['positions'],
                     batch['segment_ids'], method='features')
  head = lambda h: model.apply({'params': params}, h, method='logits')
  return chunked_losses(head, x, batch['targets'], batch['loss_mask'], z_loss,
                        model.cfg.get('loss_chunk', 0), count_misses)
