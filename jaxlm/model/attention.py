"""Causal, document-aware attention: the module and its interchangeable kernels.

All kernels take q ``[batch, q_len, heads, head_dim]``, k/v ``[batch, kv_len,
kv_heads, head_dim]`` and a ``MaskInfo``; a query attends to a key iff both are
in the same (non-zero) segment and the key's index is not after the query's
(and, with a sliding window w > 0, fewer than w slots before it).
Grouped-query attention: ``heads`` is a multiple of ``kv_heads``.

Kernels: 'xla' (reference, dense scores), 'chunked' (flash.py: blockwise with a
recomputing backward; everywhere), and jax's library kernels in kernels.py:
'splash' (TPU), 'pallas_gpu' and 'cudnn' (GPU).
"""

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jaxlm.core import platform
from jaxlm.core.config import CHOICES, LIBRARY_KERNELS
from jaxlm.core.sharding import constrain
from jaxlm.model import kernels as fused
from jaxlm.model.flash import flash_attention
from jaxlm.model.layers import Dense, Norm, rope, rope_frequencies

log = logging.getLogger('jaxlm')

_NEG = -1e30  # finite, so fully-masked (padding) rows give a finite average, not NaNs

# What remat 'minimal' keeps of a block: everything attention's backward needs (q, k, v
# after RoPE; its output and, from the chunked kernel, per-row log-sum-exp) and the
# out-projection, so the backward pass recomputes norms and the MLP but no attention.
REMAT_NAMES = ('query_proj', 'key_proj', 'value_proj', 'context', 'context_lse', 'out_proj')


class MaskInfo(NamedTuple):
  q_segment: jax.Array  # [batch, q_len] int32, 0 = padding
  kv_segment: jax.Array  # [batch, kv_len]
  q_index: jax.Array  # [batch, q_len] slot index used for causality
  kv_index: jax.Array  # [batch, kv_len]


def _mask(m: MaskInfo, window: int = 0) -> jax.Array:
  """[batch, q, kv] boolean mask; ``window`` > 0 keeps only the ``window`` latest keys."""
  qs, ks, qi, ki = m.q_segment, m.kv_segment, m.q_index, m.kv_index
  ok = ((qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
        & (ki[:, None, :] <= qi[:, :, None]))
  if window:
    ok &= qi[:, :, None] - ki[:, None, :] < window
  return ok


def _group(q, kv_heads):
  b, t, h, d = q.shape
  return q.reshape(b, t, kv_heads, h // kv_heads, d)


def xla_attention(q, k, v, m: MaskInfo, window: int = 0) -> jax.Array:
  """Reference: materializes the [q_len, kv_len] score matrix."""
  b, t, h, d = q.shape
  qg = _group(q, k.shape[2]) * (d ** -0.5)
  s = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32)
  s = jnp.where(_mask(m, window)[:, None, None], s, _NEG)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum('bkgts,bskd->btkgd', p, v)
  return o.reshape(b, t, h, d)


def chunked_attention(q, k, v, m: MaskInfo, chunk: int = 512, window: int = 0) -> jax.Array:
  """FlashAttention-2-style blocks with a recomputing backward: memory O(len * chunk)."""
  return flash_attention(q, k, v, m, chunk, window)


KERNELS = CHOICES['model.attention']  # the list is written once, in jaxlm.core.config


def _resolve(impl: str, decode: bool) -> tuple[str, bool]:
  """The kernel that will run here and whether Pallas runs interpreted.

  jax's library kernels assume queries and keys start at the same slot; the
  KV-cache path (queries at an offset) takes the index-aware chunked kernel.
  """
  if impl not in fused.KERNELS:
    return impl, False
  if decode:
    return 'chunked', False
  how = fused.mode(impl)
  if how is None:
    if impl not in _warned:
      _warned.add(impl)
      log.warning("attention '%s' runs only on %s (this step is built for %s; %s=1 interprets "
                  "Pallas kernels): using 'chunked' instead", impl, LIBRARY_KERNELS[impl].upper(),
                  platform.current(), fused.INTERPRET_ENV)
    return 'chunked', False
  return impl, how == 'interpret'


_warned: set = set()


def _local_attend(q, k, v, m: MaskInfo, impl: str, chunk: int, window: int,
                  interpret: bool) -> jax.Array:
  if impl == 'chunked':  # names its output and log-sum-exp itself ('context', 'context_lse')
    return chunked_attention(q, k, v, m, chunk, window)
  if impl == 'xla':
    return checkpoint_name(xla_attention(q, k, v, m, window), 'context')
  return checkpoint_name(fused.KERNELS[impl](q, k, v, m, window=window, interpret=interpret),
                         'context')


def _sequence_axes():
  """Mesh axes the 'act_length' logical axis is split over, if any are > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return mesh, ()
  axes = nn.logical_to_mesh_axes(('act_length',))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return mesh, tuple(a for a in axes if mesh.shape[a] > 1)


def attend(q, k, v, m: MaskInfo, impl: str, chunk: int = 512, window: int = 0) -> jax.Array:
  """Runs kernel ``impl`` on q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads,
  head_dim] -> [batch, q_len, heads, head_dim], sharded for the current mesh.

  Context parallelism (shard_map): with the sequence split over devices, each
  device keeps its slice of queries and all-gathers keys, values and their mask
  info, so activations stay split by length everywhere else. Mask indices are
  global slot indices, so causality holds across shards. jax's library kernels
  (splash, pallas_gpu, cudnn) are shard_mapped over batch and heads, since a
  Pallas call is not partitioned automatically; of them only splash can also
  split the sequence (its mask info is split like the queries).
  """
  decode = q.shape[1] != k.shape[1]  # the KV-cache path runs unsplit
  impl, interpret = _resolve(impl, decode)
  mesh, seq_axes = _sequence_axes()
  library = impl in fused.KERNELS
  if decode or mesh.empty or not (seq_axes or library):
    return _local_attend(q, k, v, m, impl, chunk, window, interpret)
  splash_cp = impl == 'splash' and seq_axes
  if library and seq_axes and not splash_cp:
    raise ValueError(f"attention '{impl}' cannot split the sequence over {seq_axes}; "
                     "use 'chunked' or 'splash' with mesh.sequence > 1")
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
  # Splash over a split sequence: one kernel for the whole length, its mask info
  # split by query block like the queries (heads share one mask).
  kernel = fused.splash_kernel(q.shape[2], q.shape[1], window, interpret,
                               _axis_size(mesh, seq_axes)) if splash_cp else None
  kernel_spec = kernel.manual_sharding_spec(
      jax.sharding.NamedSharding(mesh, P(None, seq_axes))) if splash_cp else P()

  def local(kernel, q, k, v, qs, ks, qi, ki):
    gather = lambda x: jax.lax.all_gather(x, seq_axes, axis=1, tiled=True) if seq_axes else x
    mi = MaskInfo(qs, gather(ks), qi, gather(ki))
    if kernel is not None:
      return fused.splash_attention(q, gather(k), gather(v), mi, window, interpret, kernel)
    return _local_attend(q, gather(k), gather(v), mi, impl, chunk, window, interpret)

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, row_spec, row_spec, row_spec, row_spec),
      out_specs=q_spec, check_vma=False)(kernel, q, k, v, m.q_segment, m.kv_segment, m.q_index,
                                         m.kv_index)


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
    # Names (after RoPE) for remat 'minimal' (REMAT_NAMES); no-ops otherwise.
    q = checkpoint_name(constrain(q, ('act_batch', 'act_length', 'act_heads', None)), 'query_proj')
    k = checkpoint_name(constrain(k, ('act_batch', 'act_length', 'act_kv_heads', None)), 'key_proj')
    v = checkpoint_name(constrain(v, ('act_batch', 'act_length', 'act_kv_heads', None)),
                        'value_proj')
    new_cache = None
    if cache is not None:
      upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                                 cache_index, axis=1)
      new_cache = {'k': upd(cache['k'], k), 'v': upd(cache['v'], v)}
      k, v = new_cache['k'].astype(q.dtype), new_cache['v'].astype(q.dtype)
    o = attend(q, k, v, m, c.attention, c.attention_chunk, c.sliding_window)
    o = constrain(o, ('act_batch', 'act_length', 'act_heads', None))
    out_kw = {**kw, 'std': c.init_std / (2 * c.n_layers) ** 0.5}
    out = Dense((c.d_model,), ('heads', 'head_dim'), ('embed',),
                name='out', **out_kw)(o)
    return checkpoint_name(out, 'out_proj'), new_cache
