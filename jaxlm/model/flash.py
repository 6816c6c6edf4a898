"""FlashAttention-2-style blockwise attention with its own backward pass (the 'chunked' kernel).

Forward: each query block folds in key blocks with an online softmax and keeps
only its output and per-row log-sum-exp. Backward: each block's probabilities
are recomputed from that log-sum-exp (Dao, FlashAttention-2, 2023), so training
memory is O(length * block) rather than the O(length^2) that autodiff through
the forward loop would keep.

Blocks the mask excludes entirely (keys after every query of the block, keys
outside the sliding window, other documents, padding) are never computed: each
query block loops only over its first to last live key block and a ``lax.cond``
skips dead ones in between, so causal attention does about half the block work
of the dense product and a sliding window makes it O(length * window).

Pure JAX, so it runs on every backend and inside the sequence-parallel
shard_map of ``attention.attend``; q/k/v/mask layouts are as in attention.py.
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_NEG = -1e30  # finite: masked scores stay out of the max without inf - inf NaNs
_BIG = 2**30  # stands in for +/- infinity in integer index and segment bounds


def _allowed(qs, qx, ks, kx, window: int):
  """[batch, q, kv] bool: same non-zero segment, key not after query, key inside the window."""
  ok = ((qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
        & (kx[:, None, :] <= qx[:, :, None]))
  if window:
    ok &= qx[:, :, None] - kx[:, None, :] < window
  return ok


def _summaries(seg, idx):
  """Per block, from [nblocks, batch, block]: (any valid, min/max index, min/max segment)."""
  valid = seg != 0
  lo = lambda x: jnp.where(valid, x, _BIG).min(-1)
  hi = lambda x: jnp.where(valid, x, -_BIG).max(-1)
  return valid.any(-1), lo(idx), hi(idx), lo(seg), hi(seg)


def _live_blocks(qseg, qidx, kseg, kidx, window: int):
  """[nq, nk] bool: may any (query, key) pair of these two blocks attend, in any batch row?

  Conservative bounds from each block's index and segment ranges; exact for the
  contiguous, increasing indices and segment ids that packing produces.
  """
  qa, q_lo, q_hi, qs_lo, qs_hi = (x[:, None] for x in _summaries(qseg, qidx))  # [nq, 1, batch]
  ka, k_lo, k_hi, ks_lo, ks_hi = (x[None] for x in _summaries(kseg, kidx))  # [1, nk, batch]
  live = qa & ka & (k_lo <= q_hi) & (ks_lo <= qs_hi) & (qs_lo <= ks_hi)
  if window:
    live &= q_lo - k_hi < window
  return live.any(-1)


def _bounds(live):
  """First live column and one past the last, per row of a [rows, cols] bool (0, 0 if none)."""
  n = live.shape[1]
  first = jnp.argmax(live, axis=1)
  last = n - jnp.argmax(live[:, ::-1], axis=1)
  some = live.any(1)
  return jnp.where(some, first, 0), jnp.where(some, last, 0)


def _pad(x, n: int, axis: int = 1):
  extra = n - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)  # zeros: segment 0 marks the padding as masked


def _query_blocks(x, padded: int, qc: int, kvh: int):
  """[batch, len, heads, head_dim] -> [nq, batch, kv_heads, group, qc, head_dim]."""
  b, _, h, d = x.shape
  return _pad(x, padded).reshape(b, padded // qc, qc, kvh, h // kvh, d).transpose(1, 0, 3, 4, 2, 5)


def _blocks(q, k, v, qseg, kseg, qidx, kidx, chunk: int):
  """Pads lengths to whole blocks and moves the block index first.

  Returns q [nq, batch, kv_heads, group, qc, head_dim] (scaled by head_dim^-1/2),
  k/v [nk, batch, kv_heads, kc, head_dim], segments/indices [n, batch, block].
  """
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  qc, kc = min(chunk, t), min(chunk, s)
  nq, nk = -(-t // qc), -(-s // kc)
  qb = _query_blocks(q * jnp.asarray(d ** -0.5, q.dtype), nq * qc, qc, kvh)
  kvb = lambda x: _pad(x, nk * kc).reshape(b, nk, kc, kvh, d).transpose(1, 0, 3, 2, 4)
  rows = lambda x, n, c: _pad(x, n * c).reshape(b, n, c).transpose(1, 0, 2)
  return (qb, kvb(k), kvb(v), rows(qseg, nq, qc), rows(qidx, nq, qc),
          rows(kseg, nk, kc), rows(kidx, nk, kc))


def _unblock(x, b: int, t: int):
  """[nq, batch, kv_heads, group, qc, head_dim] -> [batch, t, heads, head_dim]."""
  nq, _, kvh, g, qc, d = x.shape
  return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * qc, kvh * g, d)[:, :t]


def _forward(q, k, v, qseg, kseg, qidx, kidx, chunk, window):
  b, t, h, d = q.shape
  qb, kb, vb, qs, qx, ks, kx = _blocks(q, k, v, qseg, kseg, qidx, kidx, chunk)
  live = _live_blocks(qs, qx, ks, kx, window)
  first, last = _bounds(live)

  def query_block(i):
    qi = qb[i]  # [batch, kv_heads, group, qc, head_dim]

    def step(j, carry):
      acc, mx, den = carry
      s = jnp.einsum('bkgqd,bksd->bkgqs', qi, kb[j], preferred_element_type=jnp.float32)
      ok = _allowed(qs[i], qx[i], ks[j], kx[j], window)[:, None, None]
      new_mx = jnp.maximum(mx, jnp.where(ok, s, _NEG).max(-1))
      p = jnp.where(ok, jnp.exp(s - new_mx[..., None]), 0.0)
      corr = jnp.exp(mx - new_mx)
      acc = acc * corr[..., None] + jnp.einsum('bkgqs,bksd->bkgqd', p.astype(vb.dtype), vb[j],
                                               preferred_element_type=jnp.float32)
      return acc, new_mx, den * corr + p.sum(-1)

    body = lambda j, c: jax.lax.cond(live[i, j], functools.partial(step, j), lambda c: c, c)
    shape = qi.shape[:-1]
    init = (jnp.zeros(qi.shape, jnp.float32), jnp.full(shape, _NEG, jnp.float32),
            jnp.zeros(shape, jnp.float32))
    acc, mx, den = jax.lax.fori_loop(first[i], last[i], body, init)
    some = den > 0  # rows with no allowed key (padding) give zeros
    out = acc / jnp.where(some, den, 1.0)[..., None]
    return out.astype(q.dtype), jnp.where(some, mx + jnp.log(jnp.where(some, den, 1.0)), 0.0)

  out, lse = jax.lax.map(query_block, jnp.arange(qb.shape[0]))
  return _unblock(out, b, t), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q, k, v, qseg, kseg, qidx, kidx, chunk, window):
  return _forward(q, k, v, qseg, kseg, qidx, kidx, chunk, window)[0]


def _flash_fwd(q, k, v, qseg, kseg, qidx, kidx, chunk, window):
  out, lse = _forward(q, k, v, qseg, kseg, qidx, kidx, chunk, window)
  # Named so that remat 'minimal' can keep them and skip this forward in the backward pass.
  out, lse = checkpoint_name(out, 'context'), checkpoint_name(lse, 'context_lse')
  return out, (q, k, v, qseg, kseg, qidx, kidx, out, lse)


def _flash_bwd(chunk, window, res, d_out):
  q, k, v, qseg, kseg, qidx, kidx, out, lse = res
  b, t, h, d = q.shape
  qb, kb, vb, qs, qx, ks, kx = _blocks(q, k, v, qseg, kseg, qidx, kidx, chunk)
  live = _live_blocks(qs, qx, ks, kx, window)
  first, last = _bounds(live.T)  # per key block: its live query blocks
  nq, _, kvh, _, qc, _ = qb.shape
  grouped = lambda x: _query_blocks(x, nq * qc, qc, kvh)
  do = grouped(d_out.astype(q.dtype))
  # FlashAttention-2's D = rowsum(dO * O): the softmax-Jacobian term, one number per row.
  delta = jnp.einsum('nbkgqd,nbkgqd->nbkgq', do.astype(jnp.float32),
                     grouped(out).astype(jnp.float32))

  def key_block(dq, j):
    kj, vj = kb[j], vb[j]

    def step(i, carry):
      dq, dk, dv = carry
      qi, doi = qb[i], do[i]
      s = jnp.einsum('bkgqd,bksd->bkgqs', qi, kj, preferred_element_type=jnp.float32)
      ok = _allowed(qs[i], qx[i], ks[j], kx[j], window)[:, None, None]
      p = jnp.where(ok, jnp.exp(s - lse[i][..., None]), 0.0)
      dv = dv + jnp.einsum('bkgqs,bkgqd->bksd', p.astype(vj.dtype), doi,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum('bkgqd,bksd->bkgqs', doi, vj, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][..., None])).astype(qi.dtype)
      dk = dk + jnp.einsum('bkgqs,bkgqd->bksd', ds, qi, preferred_element_type=jnp.float32)
      dq = dq.at[i].add(jnp.einsum('bkgqs,bksd->bkgqd', ds, kj,
                                   preferred_element_type=jnp.float32))
      return dq, dk, dv

    body = lambda i, c: jax.lax.cond(live[i, j], functools.partial(step, i), lambda c: c, c)
    zeros = jnp.zeros(kj.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(first[j], last[j], body, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32),
                              jnp.arange(kb.shape[0]))
  s_len = k.shape[1]
  unkv = lambda x: x.transpose(1, 0, 3, 2, 4).reshape(b, -1, kvh, d)[:, :s_len]
  dq = _unblock(dq * d ** -0.5, b, t)
  return (dq.astype(q.dtype), unkv(dk).astype(k.dtype), unkv(dv).astype(v.dtype),
          None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, m, chunk: int = 512, window: int = 0) -> jax.Array:
  """q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads, head_dim], MaskInfo m
  -> [batch, q_len, heads, head_dim]. ``chunk``: query and key block length;
  ``window`` > 0: a query sees only the ``window`` most recent keys (itself included).
  Rows with no key to attend (padding) are zeros.
  """
  return _flash(q, k, v, m.q_segment, m.kv_segment, m.q_index, m.kv_index, chunk, window)
