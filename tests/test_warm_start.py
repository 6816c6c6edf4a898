"""jaxlm train --init_from: a new run from another run's or an HF model's parameters."""

import json

import pytest

from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.cli import main as cli
from jaxlm.data.pipeline import make_pipeline
from jaxlm.engine import build as engine
from jaxlm.run.loop import Trainer


def _first(workdir) -> dict:
  return json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[0])


def test_warm_start_first_loss_is_the_sources(tiny_cfg, tmp_path, capsys):
  tiny_cfg.checkpoint.async_save = False
  tiny_cfg.train.steps, tiny_cfg.checkpoint.every = 10, 5
  pre = tmp_path / 'pre'
  Trainer(tiny_cfg, str(pre)).run()

  # The new run's first batch is the data stream's first, as in any fresh run.
  batch = next(make_pipeline(tiny_cfg).train_iterator())
  loaded = engine.load(str(pre))
  with Checkpointer(str(pre), loaded.cfg.checkpoint, read_only=True) as ckpt:
    params5, _ = ckpt.restore(5, loaded.setup.abstract_state, params_only=True)
  want = {10: loaded.setup.eval_loss(loaded.params, [batch]),
          5: loaded.setup.eval_loss(params5, [batch])}
  assert abs(want[10] - want[5]) > 1e-3

  base = ['train', '--config=tiny', f'--config.data.path={tiny_cfg.data.path}',
          '--config.train.steps=3', '--config.train.log_every=1', '--config.optim.lr=1e-3']
  assert cli.main([*base, f'--workdir={tmp_path / "w10"}', f'--init_from={pre}']) == 0
  first = _first(tmp_path / 'w10')
  assert first['step'] == 1 and first['train/loss'] == pytest.approx(want[10], rel=1e-5)
  assert first['train/lr'] == 0.0  # a fresh schedule: warmup starts again at 0
  saved = json.loads((tmp_path / 'w10' / 'config.json').read_text())
  assert saved['train']['init_from'] == str(pre) and saved['train']['init_from_step'] == 10
  assert saved['optim']['lr'] == 1e-3
  # Rerunning the same command resumes the new run (nothing to do), not the source.
  assert cli.main([*base, f'--workdir={tmp_path / "w10"}', f'--init_from={pre}']) == 0

  assert cli.main([*base, f'--workdir={tmp_path / "w5"}', f'--init_from={pre}',
                   '--restore_step=5']) == 0
  assert _first(tmp_path / 'w5')['train/loss'] == pytest.approx(want[5], rel=1e-5)

  # An HF directory exported from the run starts the same way.
  assert cli.main(['convert', f'--to_hf={tmp_path / "hf"}', f'--workdir={pre}']) == 0
  assert cli.main([*base, f'--workdir={tmp_path / "whf"}', f'--init_from={tmp_path / "hf"}']) == 0
  assert _first(tmp_path / 'whf')['train/loss'] == pytest.approx(want[10], rel=1e-5)
  capsys.readouterr()

  # A source of another shape or family: one line, nothing written.
  for override, field in (('--config.model.d_model=64', 'model.d_model 32 (source) vs 64'),
                          ('--config.model.norm=rmsnorm', "model.norm 'layernorm' (source)")):
    assert cli.main([*base, f'--workdir={tmp_path / "bad"}', f'--init_from={pre}',
                     override]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith('jaxlm: error:')]
    assert len(lines) == 1 and field in lines[0] and 'Traceback' not in err, err
    assert not (tmp_path / 'bad' / 'config.json').exists()
  assert cli.main([*base, f'--workdir={tmp_path / "bad"}', f'--init_from={pre}',
                   '--restore_step=7']) == 2
  assert 'no checkpoint at step 7 (it has 5, 10)' in capsys.readouterr().err
