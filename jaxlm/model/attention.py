"""Causal, document-aware attention: the module and its interchangeable kernels.

All kernels take q ``[batch, q_len, heads, head_dim]``, k/v ``[batch, kv_len,
kv_heads, head_dim]`` and a ``MaskInfo``; a query attends to a key iff both are
in the same (non-zero) segment and the key's index is not after the query's.
Grouped-query attention: ``heads`` is a multiple of ``kv_heads``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.model.layers import Dense, Norm, rope, rope_frequencies
from jaxlm.sharding import constrain

_NEG = -1e30  # finite, so fully-masked (padding) rows give zeros, not NaNs


class MaskInfo(NamedTuple):
  q_segment: jax.Array  # [batch, q_len] int32, 0 = padding
  kv_segment: jax.Array  # [batch, kv_len]
  q_index: jax.Array  # [batch, q_len] slot index used for causality
  kv_index: jax.Array  # [batch, kv_len]


def _mask(m: MaskInfo, q_sl=slice(None), kv_sl=slice(None)) -> jax.Array:
  """[batch, q, kv] boolean mask for a block of queries and keys."""
  qs, ks = m.q_segment[:, q_sl], m.kv_segment[:, kv_sl]
  qi, ki = m.q_index[:, q_sl], m.kv_index[:, kv_sl]
  return ((qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
          & (ki[:, None, :] <= qi[:, :, None]))


def _group(q, kv_heads):
  b, t, h, d = q.shape
  return q.reshape(b, t, kv_heads, h // kv_heads, d)


def xla_attention(q, k, v, m: MaskInfo) -> jax.Array:
  """Reference: materializes the [q_len, kv_len] score matrix."""
  b, t, h, d = q.shape
  qg = _group(q, k.shape[2]) * (d ** -0.5)
  s = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32)
  s = jnp.where(_mask(m)[:, None, None], s, _NEG)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum('bkgts,bskd->btkgd', p, v)
  return o.reshape(b, t, h, d)


def cudnn_attention(q, k, v, m: MaskInfo) -> jax.Array:
  """jax.nn.dot_product_attention: cuDNN flash attention on GPU, XLA elsewhere."""
  mask = _mask(m)[:, None]  # [batch, 1, q, kv]
  impl = 'cudnn' if jax.devices()[0].platform == 'gpu' and q.dtype != jnp.float32 else None
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def chunked_attention(q, k, v, m: MaskInfo, chunk: int = 512) -> jax.Array:
  """Blockwise attention with an online softmax: memory O(len * chunk), not O(len^2).

  Queries are processed a block at a time (lax.map); for each, key blocks are
  folded in with lax.scan keeping running max / sum, as in FlashAttention.
  """
  b, t, h, d = q.shape
  s_len, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  qc, kc = min(chunk, t), min(chunk, s_len)
  if t % qc or s_len % kc:
    return xla_attention(q, k, v, m)  # ragged shapes are small; keep them exact
  nq, nk = t // qc, s_len // kc
  qg = (_group(q, kvh) * (d ** -0.5)).reshape(b, nq, qc, kvh, g, d)
  kb = k.reshape(b, nk, kc, kvh, d)
  vb = v.reshape(b, nk, kc, kvh, d)
  qseg, qidx = m.q_segment.reshape(b, nq, qc), m.q_index.reshape(b, nq, qc)
  kseg, kidx = m.kv_segment.reshape(b, nk, kc), m.kv_index.reshape(b, nk, kc)

  def one_query_block(args):
    qi, qs, qx = args  # [b, qc, kvh, g, d], [b, qc], [b, qc]

    def body(carry, blk):
      acc, mx, den = carry
      kk, vv, ks, kx = blk
      s = jnp.einsum('bqkgd,bskd->bkgqs', qi, kk, preferred_element_type=jnp.float32)
      ok = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0) & (kx[:, None, :] <= qx[:, :, None])
      s = jnp.where(ok[:, None, None], s, _NEG)
      new_mx = jnp.maximum(mx, s.max(-1))
      corr = jnp.exp(mx - new_mx)
      p = jnp.exp(s - new_mx[..., None])
      den = den * corr + p.sum(-1)
      acc = acc * corr[..., None] + jnp.einsum('bkgqs,bskd->bkgqd', p.astype(vv.dtype), vv,
                                                preferred_element_type=jnp.float32)
      return (acc, new_mx, den), None

    init = (jnp.zeros((b, kvh, g, qc, d), jnp.float32),
            jnp.full((b, kvh, g, qc), _NEG, jnp.float32),
            jnp.zeros((b, kvh, g, qc), jnp.float32))
    blocks = (jnp.moveaxis(kb, 1, 0), jnp.moveaxis(vb, 1, 0),
              jnp.moveaxis(kseg, 1, 0), jnp.moveaxis(kidx, 1, 0))
    (acc, _, den), _ = jax.lax.scan(body, init, blocks)
    out = acc / jnp.maximum(den, 1e-30)[..., None]  # [b, kvh, g, qc, d]
    return jnp.moveaxis(out, 3, 1).reshape(b, qc, h, d)

  outs = jax.lax.map(one_query_block, (jnp.moveaxis(qg, 1, 0), jnp.moveaxis(qseg, 1, 0),
                                       jnp.moveaxis(qidx, 1, 0)))
  return jnp.moveaxis(outs, 0, 1).reshape(b, t, h, d).astype(q.dtype)


def splash_attention(q, k, v, m: MaskInfo) -> jax.Array:
  """Hook point for TPU splash attention (Pallas).

  Plug a kernel from jax.experimental.pallas.ops.tpu.splash_attention in here;
  until one is wired, TPUs use the chunked kernel, which is exact.
  """
  return chunked_attention(q, k, v, m)


KERNELS = {
    'xla': xla_attention,
    'cudnn': cudnn_attention,
    'chunked': chunked_attention,
    'splash': splash_attention,
}


def _local_attend(q, k, v, m: MaskInfo, impl: str, chunk: int) -> jax.Array:
  if impl in ('chunked', 'splash'):
    return chunked_attention(q, k, v, m, chunk)
  return KERNELS[impl](q, k, v, m)


def _sequence_axes():
  """Mesh axes the 'act_length' logical axis is split over, if any are > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return mesh, ()
  axes = nn.logical_to_mesh_axes(('act_length',))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return mesh, tuple(a for a in axes if mesh.shape[a] > 1)


def attend(q, k, v, m: MaskInfo, impl: str, chunk: int = 512) -> jax.Array:
  """Dispatches to a kernel; with the sequence split over devices, gathers K/V first.

  Context parallelism (shard_map): each device keeps its slice of queries and
  all-gathers keys, values and their mask info over the sequence axes, so
  activations stay split by length everywhere else. Mask indices are global
  slot indices, so causality holds across shards.
  """
  mesh, seq_axes = _sequence_axes()
  if not seq_axes or q.shape[1] != k.shape[1]:  # decode (KV cache) runs unsplit
    return _local_attend(q, k, v, m, impl, chunk)
  spec = lambda *names: nn.logical_to_mesh_axes(names)
  heads_ok = all(n % _axis_size(mesh, spec('act_heads')[0]) == 0 for n in (q.shape[2], k.shape[2]))
  head = 'act_heads' if heads_ok else None
  kv_head = 'act_kv_heads' if heads_ok else None
  # kv heads must be split exactly like q heads for GQA grouping to stay local.
  if heads_ok and spec('act_heads') != spec('act_kv_heads'):
    head = kv_head = None
  q_spec = spec('act_batch', 'act_length', head, None)
  kv_spec = spec('act_batch', 'act_length', kv_head, None)
  row_spec = spec('act_batch', 'act_length')

  def local(q, k, v, qs, ks, qi, ki):
    gather = lambda x: jax.lax.all_gather(x, seq_axes, axis=1, tiled=True)
    mi = MaskInfo(qs, gather(ks), qi, gather(ki))
    return _local_attend(q, gather(k), gather(v), mi, impl, chunk)

  return jax.shard_map(
      local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec, row_spec, row_spec),
      out_specs=q_spec, check_vma=False)(q, k, v, m.q_segment, m.kv_segment, m.q_index, m.kv_index)


def _axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  return size


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention with an optional KV cache."""
  cfg: object

  @nn.compact
  def __call__(self, x, positions, m: MaskInfo, cache=None, cache_index=None):
    """x: [batch, length, embed] -> ([batch, length, embed], new cache or None).

    With a cache ({'k','v': [batch, max_len, kv_heads, head_dim]}), the new keys
    and values are written at ``cache_index`` and queries attend over the cache.
    """
    c = self.cfg
    hd = c.head_dim or c.d_model // c.n_heads
    kw = dict(use_bias=c.use_bias, std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype)
    qkv_kw = {**kw, 'use_bias': c.use_bias or c.qkv_bias}
    q = Dense((c.n_heads, hd), ('embed',), ('heads', 'head_dim'), name='query', **qkv_kw)(x)
    k = Dense((c.n_kv_heads, hd), ('embed',), ('kv_heads', 'head_dim'), name='key', **qkv_kw)(x)
    v = Dense((c.n_kv_heads, hd), ('embed',), ('kv_heads', 'head_dim'), name='value', **qkv_kw)(x)
    if c.qk_norm:  # per head, over head_dim (Qwen3)
      norm = lambda name: Norm('rmsnorm', c.norm_eps, False, c.dtype, c.param_dtype, name=name)
      q, k = norm('query_norm')(q), norm('key_norm')(k)
    if c.position == 'rope':
      freq = rope_frequencies(hd, c)
      q, k = rope(q, positions, freq), rope(k, positions, freq)
    q = constrain(q, ('act_batch', 'act_length', 'act_heads', None))
    k = constrain(k, ('act_batch', 'act_length', 'act_kv_heads', None))
    v = constrain(v, ('act_batch', 'act_length', 'act_kv_heads', None))
    new_cache = None
    if cache is not None:
      upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                                 cache_index, axis=1)
      new_cache = {'k': upd(cache['k'], k), 'v': upd(cache['v'], v)}
      k, v = new_cache['k'].astype(q.dtype), new_cache['v'].astype(q.dtype)
    o = attend(q, k, v, m, c.attention, c.attention_chunk)
    o = constrain(o, ('act_batch', 'act_length', 'act_heads', None))
    out_kw = {**kw, 'std': c.init_std / (2 * c.n_layers) ** 0.5}
    out = Dense((c.d_model,), ('heads', 'head_dim'), ('embed',),
                name='out', **out_kw)(o)
    return out, new_cache
