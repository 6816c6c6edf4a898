"""Chunked cross entropy: the loss and its gradients equal full-logits cross entropy,
on one device and vocab/length/batch-sharded, without the full logits in memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import load_config
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import sharding
from jaxlm.engine.build import Setup
from jaxlm.model.loss import chunked_losses, head_losses, num_chunks
from jaxlm.model.transformer import build_model
from jaxlm.optim.step import loss_sums

LLAMA = dict(position='rope', norm='rmsnorm', activation='swiglu', use_bias=False,
             tie_embeddings=False, n_kv_heads=2)


def _cfg(tied: bool, loss_chunk: int, **model):
  cfg = load_config('tiny')
  for k, v in {**({} if tied else LLAMA), 'loss_chunk': loss_chunk, **model}.items():
    cfg.model[k] = v
  return cfg


def _batch(b=4, t=32, vocab=320, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 2:] = 2  # two packed documents per row
  seg[0, -5:] = 0  # padding
  pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
  mask = (seg > 0).astype(np.float32)
  mask[1, :7] = 0.0
  return {'inputs': rng.integers(0, vocab, (b, t), dtype=np.int32),
          'targets': rng.integers(0, vocab, (b, t), dtype=np.int32),
          'positions': pos.astype(np.int32), 'segment_ids': seg, 'loss_mask': mask}


def _reference(model, params, batch, z_loss):
  """Today's formula: full fp32 logits, log-softmax, gather the target."""
  logits = model.apply({'params': params}, batch['inputs'], batch['positions'],
                       batch['segment_ids'])
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, batch['targets'][..., None], axis=-1)[..., 0]
  loss = lse - tgt + z_loss * jnp.square(lse)
  return jnp.sum(loss * batch['loss_mask']), jnp.sum(batch['loss_mask'])


def _params(model, t=32):
  return jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, t), jnp.int32))
                                  ['params']))()


def _value_and_grad(fn, params):
  return jax.jit(jax.value_and_grad(lambda p: fn(p)[0]))(params)


def _assert_grads_close(grads, ref, rtol):
  # fp32 sums in another order: absolute slack on the scale of the largest gradient
  # (some are ~0 in theory, e.g. key biases, and only noise in practice).
  scale = max(float(np.abs(r).max()) for r in jax.tree.leaves(ref))
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    np.testing.assert_allclose(g, r, rtol=rtol, atol=1e-6 * scale)


def test_num_chunks_divides_the_length():
  assert num_chunks(32, 8) == 4
  assert num_chunks(32, 5) == 8  # 7 chunks do not divide 32; 8 of 4 positions do
  assert num_chunks(30, 8) == 5
  assert num_chunks(32, 0) == num_chunks(32, 32) == num_chunks(32, 100) == 1


@pytest.mark.parametrize('tied,chunk,vocab_chunk,used', [(True, 8, 100, 0), (False, 5, 0, 0),
                                                         (False, 8, 64, 300)],
                         ids=['gpt2-tied', 'llama-untied', 'llama-padded-vocab'])
def test_chunked_loss_and_grads_equal_full_logits(tied, chunk, vocab_chunk, used, code_path):
  """Position chunks x vocab tiles (4 tiles of 80 or 5 of 64 of the 320 ids, or the
  whole vocab; ids from 300 on padding) give full-logits cross entropy and its gradients."""
  cfg = _cfg(tied, chunk, loss_vocab_chunk=vocab_chunk, vocab_used=used)
  model = build_model(cfg.model)
  params, batch, z = _params(model), _batch(vocab=used or 320), 1e-3
  loss, grads = _value_and_grad(lambda p: loss_sums(model, p, batch, z), params)
  ref_loss, ref_grads = _value_and_grad(lambda p: _reference(model, p, batch, z), params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  _assert_grads_close(grads, ref_grads, 1e-5)


def test_sharded_chunked_loss_equals_one_device(code_path):
  """fsdp x tensor x sequence: logits split over vocab and length, chunks and tiles strided."""
  cfg = _cfg(False, 8, loss_vocab_chunk=80)
  for k, v in dict(data=1, fsdp=2, tensor=2, sequence=2).items():
    cfg.mesh[k] = v
  setup = Setup(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:8]))
  params = _params(setup.model)
  batch, z = _batch(), 1e-3
  ref_loss, ref_grads = _value_and_grad(lambda p: _reference(setup.model, p, batch, z), params)
  fn = jax.jit(jax.value_and_grad(lambda p, b: loss_sums(setup.model, p, b, z)[0]),
               in_shardings=(setup.state_shardings.params, setup.batch_sharding))
  with sharding.activate(setup.mesh, setup.rules):
    loss, grads = fn(jax.device_put(params, setup.state_shardings.params),
                     jax.device_put(batch, setup.batch_sharding))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  _assert_grads_close(grads, ref_grads, 1e-4)


def test_full_logits_never_exist_in_the_compiled_step():
  """XLA's buffers for loss + gradients stay well below one [batch, length, vocab] fp32 array."""
  b, t, embed, vocab = 2, 256, 32, 4096
  full_logits = b * t * vocab * 4  # 8 MiB
  args = (jnp.zeros((embed, vocab)), jnp.zeros((b, t, embed)), jnp.zeros((b, t), jnp.int32),
          jnp.ones((b, t)))

  def temp_bytes(chunk):
    def loss(w, x, targets, mask):
      return jnp.sum(chunked_losses(lambda h: h @ w, x, targets, mask, 1e-4, chunk))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(0) > full_logits  # the measure sees the full logits when they exist
  assert temp_bytes(16) < full_logits / 4  # 16 chunks of 0.5 MiB logits, one at a time


@pytest.mark.parametrize('n_vocab', [16, 1], ids=['tiles', 'whole-vocab'])
def test_head_gradient_is_reduced_one_vocab_tile_at_a_time(n_vocab):
  """fsdp=8: the compiled loss gradient holds no full [embed, vocab] head array (neither
  the all-gathered kernel nor its unreduced gradient, the peak of the whole-vocab loss at
  Llama 3's 128,256 vocab), only 1/16-vocab tiles; one tile of the whole vocab holds them."""
  cfg = _cfg(False, 0)
  cfg.mesh.data, cfg.mesh.fsdp = 1, 8
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:8])
  rules = sharding.rules_for(cfg.model, cfg.mesh, mesh)
  b, t, embed, vocab = 8, 64, 64, 8192
  head = embed * vocab * 4  # one fp32 [embed, vocab] array: 2 MiB
  spec = lambda *names: sharding.logical_sharding(mesh, rules, names)
  args = (jax.ShapeDtypeStruct((b, t, embed), jnp.float32, sharding=spec('act_batch', None, None)),
          jax.ShapeDtypeStruct((embed, vocab), jnp.float32, sharding=spec('embed', 'vocab')),
          jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec('act_batch', None)),
          jax.ShapeDtypeStruct((b, t), jnp.float32, sharding=spec('act_batch', None)))
  grad = jax.jit(jax.grad(lambda x, w, tg, m: jnp.sum(
      head_losses(x, w, tg, m, 1e-4, 1, n_vocab, 0, jnp.dtype('float32'))), argnums=(0, 1)))
  with sharding.activate(mesh, rules):
    temp = grad.lower(*args).compile().memory_analysis().temp_size_in_bytes
  if n_vocab == 1:
    assert temp > 2 * head  # the measure sees full-size head arrays when they exist
  else:
    assert temp < head / 2
