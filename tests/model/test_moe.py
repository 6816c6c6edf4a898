"""The MoE MLP: dropless and capacity dispatch equal the dense reference; router losses; wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import load_config
from jaxlm.model import moe
from jaxlm.model.transformer import build_model

T, D, F, E, K = 24, 8, 16, 8, 2


def _weights(seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (T, D))
  gate = jax.random.normal(ks[1], (E, D, F)) * 0.3
  up = jax.random.normal(ks[2], (E, D, F)) * 0.3
  down = jax.random.normal(ks[3], (E, F, D)) * 0.3
  return x, gate, up, down


def _logits(seed=1, unused=()):
  logits = jax.random.normal(jax.random.key(seed), (T, E)) * 2
  for e in unused:  # experts no token picks
    logits = logits.at[:, e].set(-30.0)
  return logits


def _fast(capacity_factor):
  def f(x, logits, gate, up, down):
    r = moe.route(logits, K)
    return moe.experts_forward(x, r, gate, up, down, n_experts=E, capacity_factor=capacity_factor)
  return f


def _reference(keep_fn=None):
  def f(x, logits, gate, up, down):
    r = moe.route(logits, K)
    keep = None if keep_fn is None else keep_fn(np.asarray(r.experts))
    return moe.dense_reference(x, moe.combine_matrix(r, E, keep), gate, up, down)
  return f


def _assert_same_fwd_and_grads(fast, ref, args):
  np.testing.assert_allclose(jax.jit(fast)(*args), ref(*args), atol=1e-5, rtol=1e-5)
  cot = jax.random.normal(jax.random.key(9), (T, D))
  loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
  g_fast = jax.jit(jax.grad(loss(fast), argnums=range(5)))(*args)
  g_ref = jax.grad(loss(ref), argnums=range(5))(*args)
  for a, b in zip(g_fast, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('unused', [(), (0, 3, 5, 6)], ids=['all-used', 'some-experts-empty'])
def test_dropless_equals_dense_reference(unused):
  x, gate, up, down = _weights()
  logits = _logits(unused=unused)
  chosen = set(np.asarray(moe.route(logits, K).experts).ravel())
  assert not chosen & set(unused)
  _assert_same_fwd_and_grads(_fast(0.0), _reference(), (x, logits, gate, up, down))


def _keep_by_priority(experts, cap):
  """Which copies a capacity-`cap` expert accepts: all first choices, then all second, in order."""
  used = {}
  keep = np.zeros(experts.shape, bool)
  for j in range(experts.shape[1]):
    for t in range(experts.shape[0]):
      e = experts[t, j]
      used[e] = used.get(e, 0) + 1
      keep[t, j] = used[e] <= cap
  return keep


@pytest.mark.parametrize('factor', [0.5, 1.0, 8.0])
def test_capacity_mode_equals_dense_reference_with_the_same_drops(factor):
  x, gate, up, down = _weights()
  logits = _logits(unused=(6, 7))
  cap = moe.capacity(T, K, E, factor)
  keep = _keep_by_priority(np.asarray(moe.route(logits, K).experts), cap)
  assert keep.all() == (factor == 8.0)  # small factors really drop copies
  _assert_same_fwd_and_grads(_fast(factor), _reference(lambda ex: _keep_by_priority(ex, cap)),
                             (x, logits, gate, up, down))


def test_route_renormalizes_over_the_chosen_experts():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.1]]))
  r = moe.route(logits, 2)
  np.testing.assert_array_equal(r.experts, [[0, 1]])
  np.testing.assert_allclose(r.weights, [[0.625, 0.375]], rtol=1e-6)
  np.testing.assert_allclose(moe.route(logits, 2, renormalize=False).weights, [[0.5, 0.3]],
                             rtol=1e-6)


def test_router_losses_by_hand():
  # Uniform probabilities and a perfectly even assignment: balance loss 1, load 1 everywhere.
  even = jnp.array([[0, 1], [2, 3], [0, 1], [2, 3]])
  balance, z, load = moe.router_losses(jnp.zeros((4, 4)), even)
  np.testing.assert_allclose([balance, z], [1.0, np.log(4) ** 2], rtol=1e-6)
  np.testing.assert_allclose(load, np.ones(4))
  # All copies on experts 0 and 1, whose mean probabilities are p0, p1: loss = E * (f0 p0 + f1 p1).
  logits = jnp.array([[2.0, 1.0, 0.0, 0.0]] * 2)
  p = np.exp([2.0, 1.0, 0.0, 0.0]) / np.exp([2.0, 1.0, 0.0, 0.0]).sum()
  balance, _, load = moe.router_losses(logits, jnp.array([[0, 1], [0, 1]]))
  np.testing.assert_allclose(balance, 4 * (0.5 * p[0] + 0.5 * p[1]), rtol=1e-6)
  np.testing.assert_allclose(load, [2, 2, 0, 0])


def _moe_model(init=True, **kw):
  cfg = load_config('tiny').model
  cfg.update(dict(position='rope', norm='rmsnorm', activation='swiglu', use_bias=False,
                  tie_embeddings=False, n_layers=2, d_model=16, mlp_dim=32, n_heads=2,
                  n_kv_heads=2, moe_experts=4, moe_top_k=2, **kw))
  model = build_model(cfg)
  if not init:
    return model, None
  tokens = jnp.zeros((1, 16), jnp.int32)
  return model, jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), tokens)['params']))()


def test_moe_every_places_moe_blocks_and_scan_matches_loop():
  model_scan, params = _moe_model(moe_every=2, moe_shared_experts=1)
  model_loop, _ = _moe_model(init=False, moe_every=2, moe_shared_experts=1, scan_layers=False)
  group = params['layers']  # [groups] of block_0 (dense) and block_1 (MoE + shared expert)
  assert set(group['block_1']['mlp']) == {'router', 'gate', 'up', 'down', 'shared'}
  assert 'router' not in group['block_0']['mlp']
  as_loop = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(2):
    as_loop[f'layer_{i}'] = jax.tree.map(lambda a: a[0], group[f'block_{i}'])
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  out_scan, sown = jax.jit(lambda p: model_scan.apply({'params': p}, tokens,
                                                      mutable=['intermediates']))(params)
  out_loop = jax.jit(model_loop.apply)({'params': as_loop}, tokens)
  np.testing.assert_allclose(out_scan, out_loop, atol=1e-5)
  aux = sown['intermediates']['layers']['block_1']['mlp']['moe_aux_loss'][0]
  assert aux.shape == (1,) and np.all(np.asarray(aux) >= 1.0 - 1e-6)  # >= 1; 1 = balanced


def test_kv_cache_generation_matches_recompute():
  from jaxlm.engine.generate import generate  # noqa: PLC0415
  model, params = _moe_model()
  prompt = [5, 17, 42, 9]
  out = list(generate(model, params, [prompt], max_new_tokens=6, temperature=0.0)[0])
  # Without a cache, greedy means each generated token is the argmax after its prefix.
  logits = jax.jit(model.apply)({'params': params}, jnp.array([prompt + out]))
  assert out == [int(t) for t in jnp.argmax(logits[0, len(prompt) - 1:-1], axis=-1)]


@pytest.mark.parametrize('batch,capacity_factor', [(8, 0.0), (1, 0.0), (8, 8.0)],
                         ids=['tokens-exchanged', 'tokens-replicated', 'capacity-exchanged'])
def test_expert_parallel_layer_matches_no_mesh(batch, capacity_factor):
  """8 rows split over expert=4 x fsdp=2 go through all-to-all; 1 row cannot split, so every
  expert shard runs its own experts on it and the shards' outputs are summed. Capacity
  buffers are per token shard, so only a capacity that drops nothing matches one device."""
  import ml_collections  # noqa: PLC0415
  from jaxlm.core import mesh as mesh_lib, sharding  # noqa: PLC0415
  cfg = load_config('tiny_moe')
  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.fsdp = 1, 4, 2
  cfg.model.moe_capacity_factor = capacity_factor
  layer = moe.MoeMlp(ml_collections.FrozenConfigDict(cfg.model))
  x = jax.random.normal(jax.random.key(0), (batch, 16, cfg.model.d_model))
  cot = jax.random.normal(jax.random.key(1), x.shape)
  params = nn.unbox(layer.init(jax.random.key(2), x)['params'])
  f = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(layer.apply({'params': p}, x) * cot),
                                 argnums=(0, 1)))
  want = f(params, x)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  with sharding.activate(mesh, sharding.rules_for(cfg.model, cfg.mesh, mesh)):
    got = f(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
