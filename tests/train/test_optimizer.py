"""Schedules and their horizon: wsd's shape, and extending a run without an lr jump."""

import json

import jax
import numpy as np
import pytest

from conftest import load_config
from jaxlm.core.errors import ConfigError
from jaxlm.evals.hooks import Hook
from jaxlm.optim.optimizer import resume_horizon, schedule
from jaxlm.run.loop import Trainer


def _optim(**kw):
  o = load_config('base').optim
  o.lr, o.min_lr_ratio, o.warmup_steps = 1.0, 0.1, 10
  for k, v in kw.items():
    o[k] = v
  return o


def test_wsd_warms_up_holds_then_decays_over_the_last_fraction():
  lr = schedule(_optim(schedule='wsd', decay_fraction=0.2), 100)
  got = np.array([float(lr(s)) for s in range(0, 101)])
  np.testing.assert_allclose(got[[0, 5, 10]], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(got[10:81], 1.0)  # stable until the last 20 steps
  np.testing.assert_allclose(got[[90, 100]], [0.55, 0.1], atol=1e-6)


def test_a_new_horizon_is_taken_only_where_the_lr_does_not_move():
  cfg = load_config('base')
  cfg.optim.schedule = 'wsd'
  cfg.train.steps = 300  # saved horizon 200: wsd decays from step 180
  assert resume_horizon(cfg, 200, 150) == 300
  with pytest.raises(ConfigError, match=r"train.steps=300 would move the 'wsd' schedule's horizon "
                                        r'from 200 to 300 .*--config.optim.decay_steps=200'):
    resume_horizon(cfg, 200, 190)
  cfg.optim.schedule = 'cosine'
  assert resume_horizon(cfg, 200, 50) == 300  # still in warmup (100 steps)
  with pytest.raises(ConfigError, match='optim.decay_steps=200'):
    resume_horizon(cfg, 200, 150)
  cfg.optim.decay_steps = 200  # the user keeps the old horizon explicitly
  assert resume_horizon(cfg, 200, 150) == 200


def test_extending_a_wsd_run_keeps_the_lr_continuous(tiny_cfg, tmp_path):
  cfg = tiny_cfg
  cfg.optim.schedule, cfg.optim.decay_fraction, cfg.optim.warmup_steps = 'wsd', 0.25, 3
  cfg.train.steps, cfg.train.log_every = 20, 1
  cfg.checkpoint.every, cfg.eval.every = 0, 0
  work = tmp_path / 'w'
  first = Trainer(cfg, str(work), devices=jax.devices()[:1])
  first.add_hook(Hook(lambda ctx: first.request_stop(), every=8, at_end=False))
  assert first.run()['step'] == 8  # stable phase: the 20-step decay would start at step 15

  cfg.train.steps = 32
  assert Trainer(cfg, str(work), devices=jax.devices()[:1]).run()['step'] == 32
  rows = [json.loads(l) for l in (work / 'metrics.jsonl').read_text().splitlines()]
  lrs = {r['step']: r['train/lr'] for r in rows if 'train/lr' in r}
  assert sorted(lrs) == list(range(1, 33))
  # Step s's update uses the lr at s - 1; the curve is one 32-step wsd schedule, no jump.
  want = [float(schedule(cfg.optim, 32)(s - 1)) for s in range(1, 33)]
  np.testing.assert_allclose([lrs[s] for s in range(1, 33)], want, rtol=1e-6)
  saved = json.loads((work / 'config.json').read_text())
  assert saved['optim']['decay_steps'] == 32

  cfg.train.steps = 40  # now inside the decay: refused, naming the field to set
  with pytest.raises(ConfigError, match=r'--config.optim.decay_steps=32'):
    Trainer(cfg, str(work), devices=jax.devices()[:1]).run()
