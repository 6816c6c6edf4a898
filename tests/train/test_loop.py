"""The train loop end to end: loss falls, resume is exact, hooks run, metrics are written."""

import json

import jax
import numpy as np

from jaxlm.hooks import Hook
from jaxlm.train.loop import Trainer


def _losses(workdir):
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [(l['step'], l['train/loss']) for l in lines if 'train/loss' in l]


def _one_device():
  return jax.devices()[:1]


def test_loss_falls_within_50_steps(tiny_cfg, tmp_path):
  tiny_cfg.train.steps = 50
  tiny_cfg.train.log_every = 5
  tiny_cfg.eval.every = 0
  tiny_cfg.checkpoint.every = 0
  tiny_cfg.train.profile_steps = '3,5'
  out = Trainer(tiny_cfg, str(tmp_path / 'w'), devices=_one_device()).run()
  assert list((tmp_path / 'w' / 'profile').rglob('*.xplane.pb'))  # TensorBoard profile trace
  losses = [l for _, l in _losses(tmp_path / 'w')]
  assert losses[-1] < losses[0] - 1.0, losses
  assert out['step'] == 50 and 'eval/loss' in out  # the final eval always runs
  row = json.loads((tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()[0])
  for key in ('train/loss', 'train/lr', 'train/grad_norm', 'train/tokens_per_sec', 'train/mfu'):
    assert key in row and np.isfinite(row[key])
  assert list((tmp_path / 'w' / 'tensorboard').iterdir())
  saved = json.loads((tmp_path / 'w' / 'config.json').read_text())
  assert saved['train']['steps'] == 50


def test_interrupted_run_resumes_bit_identically(tiny_cfg, tmp_path):
  tiny_cfg.train.log_every = 1
  tiny_cfg.checkpoint.every = 7
  full = tmp_path / 'full'
  Trainer(tiny_cfg, str(full), devices=_one_device()).run()

  part = tmp_path / 'part'
  first = Trainer(tiny_cfg, str(part), devices=_one_device())
  first.add_hook(Hook(lambda ctx: first.request_stop(), every=9, at_end=False))
  assert first.run()['step'] == 9  # stopped like a SIGTERM: checkpoint at step 9
  assert Trainer(tiny_cfg, str(part), devices=_one_device()).run()['step'] == 20
  assert _losses(part) == _losses(full)


def test_user_hook_metric_reaches_metrics_jsonl(tiny_cfg, tmp_path):
  seen = []

  def my_hook(ctx):
    seen.append(ctx.step)
    text = ctx.generate(['To be'], max_new_tokens=4, temperature=0.0)[0]
    return {'eval/my_metric': float(ctx.step), 'eval/sample_len': float(len(text) > 0)}

  tiny_cfg.checkpoint.every = 0
  trainer = Trainer(tiny_cfg, str(tmp_path / 'w'), devices=_one_device())
  trainer.add_hook(Hook(my_hook, every=8))
  trainer.run()
  assert seen == [8, 16, 20]
  rows = [json.loads(l) for l in (tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'eval/my_metric' in r] == [8, 16, 20]
