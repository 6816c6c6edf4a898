"""Every attention kernel equals the xla reference, forward and gradients, on packed GQA batches.

The Pallas kernels run in Pallas interpret mode off their platform; cuDNN needs an
NVIDIA GPU and is skipped elsewhere with that reason. On a GPU the same tests run
in bf16 too (``bench/`` GPU checks run this file there).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from jaxlm.core import config as config_lib
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import sharding
from jaxlm.core.errors import ConfigError
from jaxlm.model import attention, kernels
from jaxlm.model.attention import MaskInfo, attend, chunked_attention, xla_attention

GPU = jax.default_backend() == 'gpu'
DTYPES = ['float32', 'bfloat16'] if GPU else ['float32']
# GPUs run float32 matmuls in TF32 by default (XLA and Triton), so float32 is looser there.
TOL = {'float32': 2e-3 if GPU else 2e-5, 'bfloat16': 3e-2}


def _inputs(t=64, h=4, kvh=2, d=16, dtype='float32', seed=0):
  """Two rows: row 0 packs three documents, row 1 is one document then padding."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(2, t, h, d)), dtype)
  k = jnp.asarray(rng.normal(size=(2, t, kvh, d)), dtype)
  v = jnp.asarray(rng.normal(size=(2, t, kvh, d)), dtype)
  seg = np.ones((2, t), np.int32)
  seg[0, t // 3:] = 2
  seg[0, 3 * t // 4:] = 3
  seg[1, -t // 5:] = 0
  idx = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
  return q, k, v, MaskInfo(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(idx), jnp.asarray(idx))


def _loss_and_grads(fn, q, k, v, m):
  """Output and d(weighted sum of real rows)/d(q, k, v); padding rows are outside the loss."""
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  w = w * (m.q_segment != 0)[:, :, None, None]
  loss = lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * w).sum()
  return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_matches_reference(fn, q, k, v, m, window, tol):
  out, grads = jax.jit(lambda q, k, v: _loss_and_grads(fn, q, k, v, m))(q, k, v)
  ref = lambda q, k, v: xla_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                      v.astype(jnp.float32), m, window)
  ref_out, ref_grads = jax.jit(lambda q, k, v: _loss_and_grads(ref, q, k, v, m))(q, k, v)
  valid = np.asarray(m.q_segment) != 0
  f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_allclose(f32(out)[valid], f32(ref_out)[valid], atol=tol, rtol=tol)
  for name, g, r in zip('qkv', grads, ref_grads):
    scale = np.abs(f32(r)).max()
    np.testing.assert_allclose(f32(g), f32(r), atol=tol * max(scale, 1.0), rtol=tol,
                               err_msg=f'd{name}')


def test_every_configurable_library_kernel_has_an_implementation_and_a_platform():
  # The kernel list is written once (jaxlm.core.config); kernels.py implements each.
  assert set(kernels.KERNELS) == set(config_lib.LIBRARY_KERNELS)
  assert attention.KERNELS == ('xla', 'chunked', *config_lib.LIBRARY_KERNELS)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('t,chunk,window', [(64, 16, 0), (60, 16, 11), (64, 64, 0)])
def test_chunked_matches_reference(t, chunk, window, dtype):
  q, k, v, m = _inputs(t=t, dtype=dtype)
  fn = lambda q, k, v: chunked_attention(q, k, v, m, chunk=chunk, window=window)
  _assert_matches_reference(fn, q, k, v, m, window, TOL[dtype])


def test_chunked_in_bfloat16_is_within_bfloat16_rounding():
  q, k, v, m = _inputs(dtype='bfloat16')
  fn = lambda q, k, v: chunked_attention(q, k, v, m, chunk=16, window=0)
  _assert_matches_reference(fn, q, k, v, m, 0, TOL['bfloat16'])


def _run_kernel(impl, monkeypatch):
  """The library kernel ``impl`` as it runs here (interpreted off-platform), or a visible skip."""
  if impl == 'cudnn' and not GPU:
    pytest.skip(f'cuDNN attention needs an NVIDIA GPU; this backend is {jax.default_backend()}')
  monkeypatch.setenv(kernels.INTERPRET_ENV, '1')
  how = kernels.mode(impl)
  assert how in ('native', 'interpret'), how
  assert attention._resolve(impl, decode=False) == (impl, how == 'interpret')
  return lambda q, k, v, m, window: kernels.KERNELS[impl](q, k, v, m, window=window,
                                                          interpret=how == 'interpret')


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('impl,window', [('splash', 0), ('splash', 40), ('pallas_gpu', 0),
                                         ('cudnn', 0), ('cudnn', 40)])
def test_library_kernel_matches_reference(impl, window, dtype, monkeypatch):
  kernel = _run_kernel(impl, monkeypatch)
  # Lengths that are not whole blocks (splash 128-multiples, pallas_gpu 64), so padding runs too.
  t, d = {'splash': (200, 32), 'pallas_gpu': (100, 16), 'cudnn': (128, 64)}[impl]
  q, k, v, m = _inputs(t=t, d=d, dtype=dtype if impl != 'cudnn' else 'bfloat16')
  tol = TOL['bfloat16' if impl == 'cudnn' else dtype]
  _assert_matches_reference(lambda q, k, v: kernel(q, k, v, m, window), q, k, v, m, window, tol)


def test_dead_blocks_are_never_computed():
  """NaN keys/values in blocks the mask excludes must not reach any output or gradient."""
  q, k, v, m = _inputs(t=64)

  def run(m, window, dead):
    poison = lambda x: x.at[:, dead].set(jnp.nan)
    fn = lambda q, k, v: chunked_attention(q, k, v, m, 16, window=window)
    return jax.jit(lambda q, k, v: _loss_and_grads(fn, q, k, v, m))(q, poison(k), poison(v))

  # Causal: the last key block is after every query of the blocks before it.
  out, grads = run(m, 0, slice(48, 64))
  assert np.isfinite(np.asarray(out)[:, :48]).all()
  assert np.isfinite(np.asarray(grads[0])[:, :48]).all()
  # Sliding window 11: key block 0 is out of reach of queries 27 onwards (blocks 2, 3).
  out, grads = run(m, 11, slice(0, 16))
  assert np.isfinite(np.asarray(out)[:, 32:]).all()
  assert np.isfinite(np.asarray(grads[0])[:, 32:]).all()
  # Padding: the last key block is segment 0 in every row.
  pad = m.q_segment.at[:, 48:].set(0)
  m = m._replace(q_segment=pad, kv_segment=pad)
  out, grads = run(m, 0, slice(48, 64))
  assert np.isfinite(np.asarray(out)).all() and all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_chunked_memory_is_linear_at_8k():
  """Compiled temp memory, forward and gradient, stays far below the [len, len] score matrix."""
  t, h, d = 8192, 2, 16
  args = [jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)] * 3
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  fn = lambda q, k, v, s: chunked_attention(q, k, v, MaskInfo(s, s, s, s), chunk=512)
  grad = jax.grad(lambda q, k, v, s: fn(q, k, v, s).sum(), argnums=(0, 1, 2))
  score_matrix = t * t * h * 4  # what the [t, t] fp32 scores alone would need
  for f in (fn, grad):
    temp = jax.jit(f).lower(*args, seg).compile().memory_analysis().temp_size_in_bytes
    assert temp < score_matrix / 20, (f, temp)
  ref = jax.jit(lambda q, k, v, s: xla_attention(q, k, v, MaskInfo(s, s, s, s)))
  ref_mem = ref.lower(*args, seg).compile().memory_analysis()
  assert ref_mem.temp_size_in_bytes >= score_matrix


@pytest.mark.parametrize('impl,mesh', [
    ('chunked', dict(data=1, fsdp=2, sequence=4)),  # context parallel: K/V all-gathered
    ('splash', dict(data=2, fsdp=1, tensor=4)),  # shard_map over batch and heads
    ('splash', dict(data=1, fsdp=2, sequence=2, tensor=2)),  # + mask info split like queries
    ('pallas_gpu', dict(data=1, fsdp=2, tensor=4)),
])
def test_sharded_kernel_matches_reference(impl, mesh, monkeypatch):
  if jax.device_count() < 8:
    pytest.skip(f'needs 8 devices (fake CPU devices in tests/conftest.py); {jax.device_count()} here')
  monkeypatch.setenv(kernels.INTERPRET_ENV, '1')
  cfg = load_config('tiny')
  cfg.model.n_heads, cfg.model.n_kv_heads = 8, 4
  for key, val in mesh.items():
    cfg.mesh[key] = val
  devices = mesh_lib.make_mesh(cfg.mesh)
  rules = sharding.rules_for(cfg.model, cfg.mesh, devices)
  q, k, v, m = _inputs(t=256, h=8, kvh=4, d=16)
  chunk = 32
  with sharding.activate(devices, rules):
    assert attention._sequence_axes()[1] == (('sequence',) if 'sequence' in mesh else ())
    fn = lambda q, k, v: attend(q, k, v, m, impl, chunk=chunk)
    _assert_matches_reference(fn, q, k, v, m, 0, TOL['float32'])


def test_off_platform_library_kernel_falls_back_to_chunked_with_a_reason(monkeypatch, caplog):
  monkeypatch.delenv(kernels.INTERPRET_ENV, raising=False)
  if jax.default_backend() == 'tpu':
    pytest.skip('splash is native here')
  monkeypatch.setattr(attention, '_warned', set())
  with caplog.at_level(logging.WARNING, logger='jaxlm'):
    assert attention._resolve('splash', decode=False) == ('chunked', False)
  assert "'splash' runs only on TPU" in caplog.text
  # The KV-cache path (queries at an offset) always takes the index-aware kernel.
  assert attention._resolve('pallas_gpu', decode=True) == ('chunked', False)


def test_packed_lengths_give_cudnn_segment_runs():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0], [5, 5, 5, 5, 5, 5], [1, 2, 3, 4, 0, 0]], jnp.int32)
  seqlen, offsets, overflow = kernels.packed_lengths(seg, max_segments=3)
  np.testing.assert_array_equal(seqlen, [[2, 3, -1], [6, -1, -1], [1, 1, 1]])
  np.testing.assert_array_equal(offsets, [[0, 2, -1, -1], [0, -1, -1, -1], [0, 1, 2, -1]])
  np.testing.assert_array_equal(overflow, [False, False, True])  # 4 documents > 3


@pytest.mark.parametrize('attn,changes,message', [
    ('pallas_gpu', dict(sliding_window=8), "not supported by model.attention='pallas_gpu'"),
    ('pallas_gpu', dict(sequence=2), "model.attention='pallas_gpu' cannot split the sequence"),
    ('splash', dict(sequence=2), "needs data.seq_len=32 to split into whole 128-slot blocks"),
    ('cudnn', {}, "model.attention='cudnn' needs model.dtype='bfloat16'"),
])
def test_kernel_limits_are_config_errors(attn, changes, message):
  cfg = load_config('tiny')
  cfg.model.attention = attn
  cfg.model.sliding_window = changes.get('sliding_window', 0)
  cfg.mesh.sequence = changes.get('sequence', 1)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(cfg, need_data=False)
