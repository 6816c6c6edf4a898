"""The train loop end to end: loss falls, resume is exact, hooks run, metrics are written."""

import json
import math

import jax
import numpy as np
import pytest

from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.evals.hooks import Hook
from jaxlm.run.loop import Trainer


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
  rows = [json.loads(l) for l in (tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()]
  # Step 1 (the compile) is logged without a speed; the next line times steps 2-5 only.
  assert rows[0]['step'] == 1 and 'train/tokens_per_sec' not in rows[0]
  assert rows[1]['step'] == 5
  for key in ('train/loss', 'train/lr', 'train/grad_norm', 'train/tokens_per_sec', 'train/mfu'):
    assert key in rows[1] and np.isfinite(rows[1][key])
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


def test_user_hook_metric_reaches_metrics_jsonl(tiny_cfg, tmp_path, monkeypatch):
  seen = []

  def my_hook(ctx):
    seen.append(ctx.step)
    text = ctx.generate(['To be'], max_new_tokens=4, temperature=0.0)[0]
    return {'eval/my_metric': float(ctx.step), 'eval/sample_len': float(len(text))}

  # The same run covers the config-only paths: eval.hooks=module:function, periodic
  # samples to samples.txt, and eval/perplexity next to eval/loss.
  (tmp_path / 'my_hooks.py').write_text(
      'def params_norm(ctx):\n'
      '  import jax, numpy as np\n'
      '  leaves = jax.tree.leaves(ctx.params)\n'
      '  return {"eval/params_sq": float(sum(np.sum(np.square(np.asarray(x))) for x in leaves)),\n'
      '          "eval/hook_step": float(ctx.step)}\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  tiny_cfg.eval.hooks = 'my_hooks:params_norm'
  tiny_cfg.eval.sample_every = 16
  tiny_cfg.eval.sample_prompts = 'To be|ROMEO:'
  tiny_cfg.eval.sample_tokens = 6
  tiny_cfg.checkpoint.every = 0
  trainer = Trainer(tiny_cfg, str(tmp_path / 'w'), devices=_one_device())
  trainer.add_hook(Hook(my_hook, every=8))
  trainer.run()
  assert seen == [8, 16, 20]
  rows = [json.loads(l) for l in (tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'eval/my_metric' in r] == [8, 16, 20]
  # The hook's generate call decoded 4 new tokens (tiny uses bytes: 4 characters).
  assert [r['eval/sample_len'] for r in rows if 'eval/sample_len' in r] == [4.0, 4.0, 4.0]

  # eval.hooks: called every eval.every (10) steps and at the end, on the live params.
  user = [r for r in rows if 'eval/hook_step' in r]
  assert [(r['step'], r['eval/hook_step']) for r in user] == [(10, 10.0), (20, 20.0)]
  assert user[0]['eval/params_sq'] != user[1]['eval/params_sq']  # the params moved
  evals = [r for r in rows if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [10, 20]
  for r in evals:
    assert r['eval/perplexity'] == pytest.approx(math.exp(r['eval/loss']), rel=1e-6)

  # Samples: every 16 steps and at the end, each prompt continued by 6 bytes.
  samples = (tmp_path / 'w' / 'samples.txt').read_text()
  heads = [l for l in samples.splitlines() if l.startswith('--- step')]
  assert heads == [f"--- step {s} | prompt {p!r}" for s in (16, 20) for p in ('To be', 'ROMEO:')]
  bodies = samples.split('--- step ')[1:]
  for body, p in zip(bodies, ['To be', 'ROMEO:'] * 2):
    text = body.split('\n', 1)[1].rstrip('\n')
    assert text.startswith(p) and len(text) > len(p), body


def test_preemption_sync_failure_is_logged_once(monkeypatch, caplog):
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from jaxlm.run import loop  # noqa: PLC0415

  def unavailable(step):
    raise RuntimeError('Preemption sync manager has not been initialized.')

  monkeypatch.setattr(loop.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point', unavailable)
  monkeypatch.setattr(multihost_utils, 'process_allgather', lambda x: np.array([x, x]))
  signals = loop._Signals()  # noqa: SLF001
  with caplog.at_level('INFO', logger='jaxlm'):
    assert not any(signals.preempted(step, 5) for step in range(1, 11))
  lines = [r for r in caplog.records if 'preemption sync point unavailable' in r.getMessage()]
  assert len(lines) == 1 and 'has not been initialized' in lines[0].getMessage()
  signals.stop = True
  assert not signals.preempted(11, 5) and signals.preempted(15, 5)  # agreed every 5 steps


def test_a_failing_hook_keeps_the_steps_checkpoint(tiny_cfg, tmp_path):
  """An eval that runs out of memory (simulated: a hook that raises) costs no checkpoint."""
  def eval_out_of_memory(ctx):
    raise RuntimeError('RESOURCE_EXHAUSTED: out of memory while running eval (simulated)')

  tiny_cfg.checkpoint.every = 10
  trainer = Trainer(tiny_cfg, str(tmp_path / 'w'), devices=_one_device())
  trainer.add_hook(Hook(eval_out_of_memory, every=10))
  with pytest.raises(RuntimeError, match='RESOURCE_EXHAUSTED'):
    trainer.run()
  with Checkpointer(str(tmp_path / 'w'), tiny_cfg.checkpoint, read_only=True) as ckpt:
    assert ckpt.steps() == [10]  # written before the hook ran, and finished (async save)


def test_moe_router_metrics_reach_metrics_jsonl(tiny_cfg, tmp_path):
  from conftest import load_config  # noqa: PLC0415
  cfg = load_config('tiny_moe')
  cfg.data.path = tiny_cfg.data.path
  cfg.train.steps, cfg.train.log_every, cfg.eval.every = 2, 1, 0
  Trainer(cfg, str(tmp_path / 'w'), devices=_one_device()).run()
  rows = [json.loads(l) for l in (tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()]
  logged = [r for r in rows if 'train/loss' in r]
  assert len(logged) == 2
  for r in logged:
    assert r['train/moe_aux_loss'] >= 1.0 and r['train/moe_router_z_loss'] > 0.0
    assert r['train/moe_load_max'] >= 1.0 >= r['train/moe_load_min'] >= 0.0
