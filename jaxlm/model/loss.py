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

from jaxlm.core.sharding import constrain
from jaxlm.model import head


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


def _vocab_split(n: int, a):
  """[..., vocab] -> [n, ..., vocab / n]: tile k holds vocab ids k, k + n, k + 2n, ...

  Strided, like the position chunks: with the vocab split over 'tensor', every
  shard holds an equal share of every tile.
  """
  return jnp.moveaxis(a.reshape(*a.shape[:-1], a.shape[-1] // n, n), -1, 0)


def _tile_logits(xc, w, k, n_v, vocab_used, dtype):
  """fp32 logits [batch, c, vocab / n_v] of x chunk [batch, c, embed] and head tile k
  [embed, vocab / n_v], computed in ``dtype`` as the Dense head does; and the tile's
  vocab ids."""
  ids = jnp.arange(w.shape[-1], dtype=jnp.int32) * n_v + k
  logits = jax.lax.dot_general(xc.astype(dtype), w.astype(dtype), (((2,), (0,)), ((), ())))
  logits = constrain(logits.astype(jnp.float32), ('act_batch', 'act_length', 'act_vocab'))
  return head.mask_padding(logits, ids, vocab_used), ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def head_losses(x, kernel, targets, mask, z_loss, n_pos, n_vocab, vocab_used, dtype):
  """Summed masked token losses per sequence of the LM head ``x @ kernel``, ``[batch]``.

  x [batch, length, embed]; kernel [embed, vocab] (the head's, or the tied
  embedding transposed); targets, mask [batch, length]. Logits are built one
  block of ``length / n_pos`` positions x ``vocab / n_vocab`` vocab entries at a
  time (online log-sum-exp over the vocab tiles), and the gradient is written
  by hand: the backward pass recomputes each block and adds its share to dx
  and to that vocab tile's kernel gradient, which is reduced to the kernel's
  sharding (a reduce-scatter over 'fsdp') before the next tile. So no full
  ``[batch, length, vocab]`` logits and no full-size copy of the head, its
  gradient or its all-gathered kernel exist at once: only one tile of each.
  ``vocab_used`` > 0: ids from there on are padding (logit -1e30).
  """
  return _head_fwd(x, kernel, targets, mask, z_loss, n_pos, n_vocab, vocab_used, dtype)[0]


def _pos_split(n: int, a):  # [batch, length, ...] -> [n, batch, length / n, ...], strided
  b, t = a.shape[:2]
  return jnp.moveaxis(a.reshape(b, t // n, n, *a.shape[2:]), 2, 0)


def _pos_merge(a):  # inverse of _pos_split
  n, b, c = a.shape[:3]
  return jnp.moveaxis(a, 0, 2).reshape(b, c * n, *a.shape[3:])


def _head_fwd(x, kernel, targets, mask, z_loss, n_pos, n_vocab, vocab_used, dtype):
  xs, ts = _pos_split(n_pos, x), _pos_split(n_pos, targets)

  def tile(carry, wk):  # one vocab tile over every position chunk
    w, k = wk

    def chunk(_, c):
      xc, tc, m, s, tl = c
      xc = constrain(xc, ('act_batch', 'act_length', 'act_embed'))
      logits, ids = _tile_logits(xc, w, k, n_vocab, vocab_used, dtype)
      m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
      s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
      # A one-hot product, not a gather: each vocab shard sums its own slice.
      tl = tl + jnp.sum(jnp.where(ids == tc[..., None], logits, 0.0), axis=-1)
      return None, (m_new, s, tl)

    _, carry = jax.lax.scan(chunk, None, (xs, ts, *carry))
    return carry, None

  zero = jnp.zeros(ts.shape, jnp.float32)
  (m, s, tl), _ = jax.lax.scan(
      tile, (jnp.full(ts.shape, -jnp.inf, jnp.float32), zero, zero),
      (_vocab_split(n_vocab, kernel), jnp.arange(n_vocab, dtype=jnp.int32)))
  lse = _pos_merge(m + jnp.log(s))  # [batch, length]
  mask = mask.astype(jnp.float32)
  losses = (lse - _pos_merge(tl) + z_loss * jnp.square(lse)) * mask
  return jnp.sum(losses, axis=-1), (x, kernel, targets, mask, lse)


def _head_bwd(z_loss, n_pos, n_vocab, vocab_used, dtype, res, g):
  x, kernel, targets, mask, lse = res
  # d(loss)/d(logits) = softmax * (1 + 2 z lse) - onehot, times g * mask per position.
  scale = g[:, None] * mask
  xs, ts = _pos_split(n_pos, x), _pos_split(n_pos, targets)
  ls, ss = _pos_split(n_pos, lse), _pos_split(n_pos, scale)

  def tile(dx, wk):
    w, k = wk

    def chunk(dw, c):
      xc, tc, lc, sc, dxc = c
      xc = constrain(xc, ('act_batch', 'act_length', 'act_embed'))
      logits, ids = _tile_logits(xc, w, k, n_vocab, vocab_used, dtype)
      p = jnp.exp(logits - lc[..., None]) * (1.0 + 2.0 * z_loss * lc)[..., None]
      d = ((p - (ids == tc[..., None])) * sc[..., None]).astype(dtype)
      dxc = dxc + jax.lax.dot_general(d, w.astype(dtype), (((2,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32)
      dw = dw + jax.lax.dot_general(xc.astype(dtype), d, (((0, 1), (0, 1)), ((), ())),
                                    preferred_element_type=jnp.float32)
      return dw, constrain(dxc, ('act_batch', 'act_length', 'act_embed'))

    dw, dx = jax.lax.scan(chunk, jnp.zeros(w.shape, jnp.float32), (xs, ts, ls, ss, dx))
    # Reduced to the kernel's own sharding here, one tile at a time.
    return dx, constrain(dw, ('embed', 'vocab'))

  dx, dws = jax.lax.scan(tile, jnp.zeros(xs.shape, jnp.float32),
                         (_vocab_split(n_vocab, kernel), jnp.arange(n_vocab, dtype=jnp.int32)))
  dkernel = jnp.moveaxis(dws, 0, -1).reshape(kernel.shape)
  return (_pos_merge(dx).astype(x.dtype), dkernel.astype(kernel.dtype), None, None)


head_losses.defvjp(_head_fwd, _head_bwd)


def model_losses(model, params, x, targets, mask, z_loss: float = 0.0, count_misses: bool = False):
  """Summed masked losses per sequence ``[batch]``; x: final hidden states [batch, length, embed].

  The model's head and loss in blocks of ``model.loss_chunk`` positions x
  ``model.loss_vocab_chunk`` vocab entries (``head_losses``). With
  ``count_misses`` (which needs whole-vocab argmaxes), or when the positions
  fit one chunk: ``chunked_losses``, position chunks only.
  """
  c = model.cfg
  n_pos = num_chunks(targets.shape[1], c.get('loss_chunk', 0))
  if count_misses or n_pos == 1:
    # Unchunked positions: autodiff keeps the [batch, length, vocab] logits for the
    # backward pass rather than recomputing them (a second head matmul: ~10% of a
    # GPT-2 small step), as loss_chunk >= length asks.
    logits_of = lambda h: model.apply({'params': params}, h, method='logits')
    return chunked_losses(logits_of, x, targets, mask, z_loss, c.get('loss_chunk', 0), count_misses)
  return head_losses(x, head.kernel(params, c), targets, mask, float(z_loss), n_pos,
                     num_chunks(c.vocab_size, c.get('loss_vocab_chunk', 0)), head.vocab_used(c),
                     jnp.dtype(c.dtype))


def sequence_losses(model, params, batch, z_loss: float = 0.0, count_misses: bool = False):
  """Summed masked next-token losses per sequence, ``[batch]`` fp32.

  batch: dict of [batch, length] arrays (inputs, targets, positions,
  segment_ids, loss_mask). Blocked as ``model_losses`` says.
  """
  x, _ = model.apply({'params': params}, batch['inputs'], batch['positions'],
                     batch['segment_ids'], method='features')
  return model_losses(model, params, x, batch['targets'], batch['loss_mask'], z_loss,
                      count_misses)
