"""Each optimizer setting changes the update it should, checked against optax itself.

A decay mask dropped (every parameter decayed), or clipping removed, fails these.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import load_config
from jaxlm.optim.optimizer import decay_mask, make_optimizer, schedule


def _optim(**kw):
  o = load_config('tiny').optim
  o.warmup_steps, o.schedule, o.lr, o.weight_decay = 0, 'constant', 0.01, 0.1
  for k, v in kw.items():
    o[k] = v
  return o


def _params():
  """A model-shaped tree: kernels decay; norms, biases and embeddings do not (base config)."""
  one = lambda *s: jnp.ones(s, jnp.float32)
  return {'embed': {'embedding': one(5, 3)},
          'layers': {'attn': {'query': {'kernel': one(3, 2), 'bias': one(2)}},
                     'attn_norm': {'scale': one(3)},
                     'mlp': {'up': {'kernel': one(3, 4)}}},
          'final_norm': {'scale': one(3)}, 'head': {'kernel': one(3, 5)}}


DECAYED = {'layers/attn/query/kernel', 'layers/mlp/up/kernel', 'head/kernel'}


def _flat(tree):
  return {'/'.join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_weight_decay_reaches_exactly_the_unexcluded_parameters():
  """Zero gradients: Adam's step is 0, so the whole update is the decay, -lr * wd * p."""
  o = _optim(clip_norm=0.0)
  assert {k for k, v in _flat(decay_mask(_params(), o.decay_exclude)).items() if v} == DECAYED
  tx = make_optimizer(o, 10)
  params = _params()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for name, u in _flat(updates).items():
    want = -o.lr * o.weight_decay if name in DECAYED else 0.0
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, atol=0, err_msg=name)
  # Another exclusion list moves the line: 'kernel' excluded leaves nothing decayed but none.
  only = make_optimizer(_optim(clip_norm=0.0, decay_exclude='kernel'), 10)
  u2, _ = only.update(jax.tree.map(jnp.zeros_like, params), only.init(params), params)
  assert {k for k, v in _flat(u2).items() if np.any(np.asarray(v) != 0)} == \
      set(_flat(params)) - DECAYED


def _run(tx, params, grads):
  state, out = tx.init(params), []
  for g in grads:
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(params)
  return out


def test_clipping_equals_optax_clip_by_global_norm_then_adamw():
  """Five steps with gradient norms 5..25 (all above clip_norm=1, and each a different
  size, so Adam's moments see the clipping): the same params as optax's chain, to
  float rounding; without the clip they differ."""
  o = _optim(clip_norm=1.0)
  params = _params()
  rng = np.random.default_rng(0)
  grads = []
  for i in range(5):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    norm = float(optax.tree.norm(g))
    grads.append(jax.tree.map(lambda x, s=5.0 * (i + 1) / norm: x * s, g))
  adamw = lambda: optax.adamw(schedule(o, 10), b1=o.b1, b2=o.b2, eps=o.eps,
                              weight_decay=o.weight_decay,
                              mask=lambda p: decay_mask(p, o.decay_exclude))
  got = _run(make_optimizer(o, 10), params, grads)
  want = _run(optax.chain(optax.clip_by_global_norm(1.0), adamw()), params, grads)
  unclipped = _run(adamw(), params, grads)
  for g, w, u in zip(got, want, unclipped):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g, w)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(got[-1]), jax.tree.leaves(unclipped[-1])))
  assert diff > 1e-3, diff


def test_clip_norm_zero_is_plain_adamw():
  o = _optim(clip_norm=0.0)
  params = _params()
  g = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
  adamw = optax.adamw(schedule(o, 10), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=lambda p: decay_mask(p, o.decay_exclude))
  jax.tree.map(np.testing.assert_array_equal, _run(make_optimizer(o, 10), params, [g])[0],
               _run(adamw, params, [g])[0])
