"""Attention kernels shipped with jax for one platform: splash (TPU), Pallas flash and cuDNN (GPU).

Each takes the layouts of ``attention.py`` for self-attention (queries and keys
the same slots, so ``q_index == kv_index``) and never builds a [len, len] mask
or bias. ``attention.attend`` shards them over batch and heads with shard_map
(Pallas calls have no automatic partitioning), splash also over the sequence,
and sends the KV-cache decode path, whose queries sit at an offset, to the
index-aware chunked kernel.

Off their platform the Pallas kernels run in Pallas interpret mode when
``JAXLM_PALLAS_INTERPRET=1`` (slow; what the CPU tests use); otherwise
``attend`` logs why and uses the chunked kernel instead.
"""

import concurrent.futures
import functools

import jax
import jax.numpy as jnp

from jaxlm.core import platform
from jaxlm.core.platform import INTERPRET_ENV  # noqa: F401  (tests and bench set it through here)


def mode(impl: str) -> str | None:
  """'native', 'interpret' (Pallas interpreter, off-platform) or None (cannot run in this step)."""
  return platform.kernel_mode(impl)


def _pad_len(x, n: int):
  """Pads axis 1 to length n with zeros (segment 0: padding no real query attends)."""
  extra = n - x.shape[1]
  return x if not extra else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


@functools.lru_cache(maxsize=None)
def splash_kernel(heads: int, length: int, window: int, interpret: bool, q_shards: int = 1):
  """The splash kernel for ``length`` slots (whole blocks), its mask info split in ``q_shards``.

  With ``q_shards`` > 1 (context parallelism) the kernel is a pytree whose mask
  info shard_map splits by query block (``kernel.manual_sharding_spec``), so
  each device's queries keep their global causal positions.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
      splash_attention_kernel as sk, splash_attention_mask as sm)
  local = length // q_shards
  block = next(b for b in (512, 256, 128) if local % b == 0)  # TPU lanes: multiples of 128
  shape = (length, length)
  # Causal is the window's right edge: LocalMask (left, right=0) keeps window - 1 earlier keys.
  one = sm.LocalMask(shape, (window - 1, 0), offset=0) if window else sm.CausalMask(shape)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  # The kernel holds its mask info as arrays and is cached, so they must be concrete, not
  # tracers of whichever trace first asked. ensure_compile_time_eval is not enough inside
  # flax's nn.scan (its partial evaluation of the layer body, without remat, still made them
  # tracers, which escaped: UnexpectedTracerError on the TPU compile path), so the kernel is
  # built on a thread of its own, where jax has no trace at all (trace state is per thread).
  def build():
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=q_shards, interpret=interpret)

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(build).result()


def splash_attention(q, k, v, m, window: int = 0, interpret: bool = False,
                     kernel=None) -> jax.Array:
  """TPU splash attention (Pallas): causal (+ sliding window) mask, segment ids, GQA.

  Splash skips blocks its static mask excludes; segment ids mask the rest, so
  packed documents never see each other. Lengths are padded to whole blocks of
  128. ``kernel``: this device's share of a ``splash_kernel(..., q_shards)``,
  for a slice of queries against all keys (context parallelism; no padding).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # noqa: PLC0415
  b, t, h, d = q.shape
  n = t if kernel is not None else -(-t // 128) * 128
  n_kv = k.shape[1] if kernel is not None else n
  if kernel is None:
    kernel = splash_kernel(h, n, window, interpret)
  heads_first = lambda x, n: _pad_len(x, n).transpose(0, 2, 1, 3)  # [batch, heads, len, head_dim]
  seg = sk.SegmentIds(_pad_len(m.q_segment, n), _pad_len(m.kv_segment, n_kv))
  out = jax.vmap(kernel)(heads_first(q * jnp.asarray(d ** -0.5, q.dtype), n),
                         heads_first(k, n_kv), heads_first(v, n_kv), segment_ids=seg)
  return out.transpose(0, 2, 1, 3)[:, :t]


def pallas_gpu_attention(q, k, v, m, window: int = 0, interpret: bool = False) -> jax.Array:
  """jax's Pallas (Triton) flash attention for GPU: causal, segment ids; GQA by repeating K/V.

  The kernel takes one segment-id array for queries and keys (self-attention)
  and has no sliding window (config validation refuses one).
  """
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # noqa: PLC0415
  if window:
    raise ValueError("attention 'pallas_gpu' has no sliding window")
  b, t, h, d = q.shape
  groups = h // k.shape[2]
  block = 64
  n = -(-t // block) * block
  k, v = (_pad_len(jnp.repeat(x, groups, axis=2), n) for x in (k, v))
  sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block,
                                   block_kv_dkv=block, block_q_dq=block, block_kv_dq=block)
  out = gpu_attention.mha(_pad_len(q, n), k, v, _pad_len(m.q_segment, n), sm_scale=d ** -0.5,
                          causal=True, block_sizes=sizes, interpret=interpret)
  return out[:, :t]


# cuDNN's packed layout has a static number of segments per row, and its softmax
# statistics are [batch * that, heads, len] floats: a bound, not len, keeps them linear.
MAX_SEGMENTS = 64


def packed_lengths(segment, max_segments: int = MAX_SEGMENTS):
  """cuDNN's packed-sequence layout from segment ids [batch, len] (contiguous runs).

  Returns (seqlen [batch, max_segments], offsets [batch, max_segments + 1],
  overflow [batch]): the length and start of each run of one non-zero segment
  id in order, then -1 (cuDNN's filler); overflow marks rows with more runs
  than fit. Padding (segment 0) gets no entry.
  """
  t = segment.shape[1]
  prev = jnp.pad(segment, [(0, 0), (1, 0)], constant_values=0)[:, :-1]
  starts = (segment != prev) & (segment != 0)  # [batch, len]
  nxt = jnp.pad(segment, [(0, 0), (0, 1)], constant_values=0)[:, 1:]
  ends = (segment != nxt) & (segment != 0)
  pos = jnp.arange(t, dtype=jnp.int32)

  def order(mask):  # [batch, max_segments]: run starts (or ends) in order, then t
    x = jnp.sort(jnp.where(mask, pos, t), axis=1)
    return jnp.pad(x, [(0, 0), (0, max(0, max_segments - t))], constant_values=t)[:, :max_segments]

  first, last = order(starts), order(ends)
  some = first < t
  seqlen = jnp.where(some, last - first + 1, -1).astype(jnp.int32)
  offsets = jnp.where(some, first, -1).astype(jnp.int32)
  overflow = starts.sum(1) > max_segments
  return seqlen, jnp.pad(offsets, [(0, 0), (0, 1)], constant_values=-1), overflow


def cudnn_attention(q, k, v, m, window: int = 0, interpret: bool = False) -> jax.Array:
  """cuDNN flash attention (GPU only): causal, packed segments as cuDNN ragged offsets.

  ``jax.nn.dot_product_attention`` takes no segment ids (as of jax 0.10), so this
  calls the function it wraps with per-row segment lengths and offsets, cuDNN's
  packed (THD) layout; fp16/bf16 only. A row packing more than ``MAX_SEGMENTS``
  documents comes out NaN (so the loss says so) rather than silently wrong.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415
  del interpret  # cuDNN has no interpreter
  seqlen, offsets, overflow = packed_lengths(m.q_segment)
  out = cudnn.dot_product_attention(
      q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets, kv_offsets=offsets,
      scale=q.shape[-1] ** -0.5, mask_type=cudnn.MaskType.PADDING_CAUSAL,
      sliding_window_length=window or None)
  return jnp.where(overflow[:, None, None, None], jnp.nan, out).astype(out.dtype)


KERNELS = {'splash': splash_attention, 'pallas_gpu': pallas_gpu_attention,
           'cudnn': cudnn_attention}
