"""The train step: MoE router losses enter the objective ('loss' stays CE); the on-device
guard leaves params and optimizer state as they were on a non-finite or spiking step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import load_config
from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.core.mesh import make_mesh
from jaxlm.core.tree import all_finite
from jaxlm.data.pipeline import make_pipeline
from jaxlm.engine.build import Setup
from jaxlm.model.transformer import build_model
from jaxlm.optim.step import objective_sums
from jaxlm.run.loop import Trainer



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


BAD_STEP = 7  # the step whose batch is poisoned


def _rows(workdir):
  # Strict JSON: NaN/Infinity literals are an error, not a float.
  def refuse(name):
    raise ValueError(f'non-standard JSON constant {name}')
  return [json.loads(l, parse_constant=refuse)
          for l in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _poison_batch_at(monkeypatch, step: int):
  """Setup.device_batch gives batch number ``step`` a NaN loss mask (so a NaN loss and grads)."""
  real = Setup.device_batch
  calls = []

  def device_batch(self, local):
    calls.append(1)
    if len(calls) == step:
      local = dict(local, loss_mask=np.full_like(np.asarray(local['loss_mask']), np.nan))
    return real(self, local)

  monkeypatch.setattr(Setup, 'device_batch', device_batch)


def test_non_finite_step_is_skipped_and_the_run_continues_as_if_it_never_happened(
    tiny_cfg, tmp_path, monkeypatch):
  cfg = tiny_cfg
  cfg.train.log_every = 1
  cfg.checkpoint.every = 5
  cfg.eval.every = 0
  devices = jax.devices()[:1]
  work = tmp_path / 'w'
  _poison_batch_at(monkeypatch, BAD_STEP)
  out = Trainer(cfg, str(work), devices=devices).run()
  monkeypatch.undo()
  assert out['step'] == 20 and not out['stopped_early']

  rows = {r['step']: r for r in _rows(work) if 'train/loss' in r}
  assert rows[BAD_STEP]['train/loss'] is None  # NaN is written as null
  assert [rows[s]['train/skipped_steps'] for s in (BAD_STEP - 1, BAD_STEP, 20)] == [0, 1, 1]

  # The reference: the same batches through the same step, with update BAD_STEP left out.
  setup = Setup(cfg.copy_and_resolve_references(), make_mesh(cfg.mesh, devices))
  state = setup.init_state()
  it = make_pipeline(cfg).train_iterator()
  want = {}
  for step in range(1, 21):
    batch = setup.device_batch(next(it))
    if step == BAD_STEP:
      state = state.replace(step=state.step + 1)
      continue
    state, m = setup.train_step(state, batch)
    want[step] = float(m['loss'])
  assert {s: rows[s]['train/loss'] for s in want} == want

  ckpt = Checkpointer(str(work), cfg.checkpoint, read_only=True)
  for step in ckpt.steps():
    restored, _ = ckpt.restore(step, setup.abstract_state)
    assert bool(all_finite(restored)), f'checkpoint {step} is not finite'
  assert int(restored.skipped_steps) == 1  # the count is saved, so it survives a resume
  ckpt.close()


@pytest.mark.parametrize('factor, skipped', [(0.0, 0), (3.0, 1)])
def test_loss_spike_guard_is_off_by_default_and_skips_when_on(tiny_cfg, factor, skipped):
  cfg = tiny_cfg
  cfg.train.spike_factor = factor
  cfg.optim.warmup_steps = 0  # the first update moves the params
  setup = Setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
  # A running mean far below the first loss (~5.5) makes that loss a spike.
  state = setup.init_state().replace(loss_avg=jax.numpy.float32(0.5))
  before = jax.device_get(state.params)
  batch = setup.device_batch(next(make_pipeline(cfg).train_iterator()))
  state, m = setup.train_step(state, batch)
  assert int(m['skipped_steps']) == skipped and np.isfinite(float(m['loss']))
  same = jax.tree.map(np.array_equal, before, jax.device_get(state.params))
  assert all(jax.tree.leaves(same)) == bool(skipped)
