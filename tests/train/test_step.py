"""The train step's objective: MoE router losses are added with their weights; 'loss' stays CE."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from conftest import load_config
from jaxlm.model.transformer import build_model
from jaxlm.train.step import objective_sums


def _batch(b=4, t=16):
  tokens = np.random.default_rng(0).integers(0, 256, (b, t + 1))
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.broadcast_to(np.arange(t), (b, t)),
          'segment_ids': np.ones((b, t), np.int32), 'loss_mask': np.ones((b, t), np.float32)}


def test_moe_router_losses_enter_the_objective_with_their_weights():
  cfg = load_config('tiny_moe').model
  batch = _batch()
  models = {}
  for name, (aux_w, z_w) in {'off': (0.0, 0.0), 'on': (0.5, 0.25)}.items():
    with cfg.unlocked():
      cfg.moe_aux_loss_weight, cfg.moe_z_loss_weight = aux_w, z_w
    models[name] = build_model(cfg)
  init = lambda: models['off'].init(jax.random.key(0), batch['inputs'])['params']
  params = jax.jit(lambda: nn.unbox(init()))()

  def run(name):
    f = lambda p: objective_sums(models[name], p, batch)
    (total, (count, extras)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return float(total), float(count), {k: float(v) for k, v in extras.items()}, grads

  t_off, count, ex_off, g_off = run('off')
  t_on, _, ex_on, g_on = run('on')
  assert count == 64
  assert ex_on['ce'] == ex_off['ce'] == t_off  # the token loss does not depend on the weights
  aux, z = ex_on['moe_aux_loss'] / count, ex_on['moe_router_z_loss'] / count
  assert aux >= 1.0 and z > 0.0  # balance loss is 1 at perfect balance, above it otherwise
  np.testing.assert_allclose(t_on, t_off + (0.5 * aux + 0.25 * z) * count, rtol=1e-6)
  # The router's gradient carries the extra terms.
  router_off = g_off['layers']['mlp']['router']
  router_on = g_on['layers']['mlp']['router']
  assert float(jnp.abs(router_on - router_off).max()) > 1e-3 * float(jnp.abs(router_off).max())
