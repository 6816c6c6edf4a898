"""All attention kernels agree, with GQA and packed segments; chunked memory is linear."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model.attention import MaskInfo, attend, chunked_attention, xla_attention


def _inputs(t=64, h=4, kvh=2, d=16, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(2, t, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, t, kvh, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, t, kvh, d)), jnp.float32)
  seg = np.ones((2, t), np.int32)
  seg[0, t // 3:] = 2  # two packed documents in row 0
  seg[1, -5:] = 0  # padding at the end of row 1
  idx = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
  return q, k, v, MaskInfo(jnp.asarray(seg), jnp.asarray(seg), jnp.asarray(idx), jnp.asarray(idx))


@pytest.mark.parametrize('impl', ['cudnn', 'chunked', 'splash'])
def test_kernels_match_reference(impl):
  q, k, v, m = _inputs()
  ref = xla_attention(q, k, v, m)
  out = attend(q, k, v, m, impl, chunk=16)
  valid = np.asarray(m.q_segment) != 0
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=2e-5)


def test_chunked_memory_is_linear_at_8k():
  t, h, d = 8192, 2, 16
  args = [jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)] * 3
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  fn = lambda q, k, v, s: chunked_attention(q, k, v, MaskInfo(s, s, s, s), chunk=512)
  mem = jax.jit(fn).lower(*args, seg).compile().memory_analysis()
  score_matrix = t * t * h * 4  # what the [t, t] fp32 scores alone would need
  assert mem.temp_size_in_bytes < score_matrix / 20, mem.temp_size_in_bytes
  ref = jax.jit(lambda q, k, v, s: xla_attention(q, k, v, MaskInfo(s, s, s, s)))
  ref_mem = ref.lower(*args, seg).compile().memory_analysis()
  assert ref_mem.temp_size_in_bytes >= score_matrix
