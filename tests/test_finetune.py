"""jaxlm.run.finetune: response-only loss mask, packing, and a fine-tune whose loss falls."""

import json
import os

import numpy as np
import pytest

from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.cli import main as cli
from jaxlm.data import pairs as ft
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.engine import build as engine
from jaxlm.run.loop import Trainer

PAIRS = [('Q: capital of France?\nA:', ' Paris'), ('Q: 2+2?\nA:', ' four'),
         ('Q: colour of the sky?\nA:', ' blue'), ('Q: opposite of hot?\nA:', ' cold')]


def test_loss_mask_covers_only_response_and_eos():
  tok = ByteTokenizer()
  docs = [ft.encode_pair(tok, p, r) for p, r in PAIRS]
  rows = ft.pack_rows(docs, seq_len=48)
  m = rows['loss_mask'].astype(bool)
  # Every masked target is a response byte or EOS; every prompt byte target is unmasked.
  masked_targets = rows['targets'][m]
  want = np.concatenate([np.append(tok.encode(r), tok.eos_id) for _, r in PAIRS])
  np.testing.assert_array_equal(np.sort(masked_targets), np.sort(want))
  assert m.sum() == sum(len(r) + 1 for _, r in PAIRS)
  # Documents are separate segments whose positions restart at 0; padding is segment 0.
  seg = rows['segment_ids']
  assert seg.max() >= 2 and np.all(rows['positions'][seg == 0] == 0)
  assert np.all(rows['loss_mask'][seg == 0] == 0)
  starts = (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)
  assert np.all(rows['positions'][:, 1:][starts] == 0)


def _sft_losses(workdir):
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {l['step']: l['train/loss'] for l in lines}


def test_finetune_from_a_pretrained_run_lowers_response_loss(tiny_cfg, tmp_path):
  tiny_cfg.checkpoint.async_save = False
  tiny_cfg.train.steps = 10
  tiny_cfg.checkpoint.every = 5  # steps 5 and 10, for --restore_step
  Trainer(tiny_cfg, str(tmp_path / 'pre')).run()
  data = tmp_path / 'pairs.jsonl'
  data.write_text(''.join(json.dumps({'prompt': p, 'response': r}) + '\n' for p, r in PAIRS))

  # The fine-tune's first batch holds each of the 4 packed rows twice (batch 8, one fresh
  # permutation per pass), so its loss is the masked mean over the rows: the loss that
  # step 1 must report for the params it started from.
  tok = ByteTokenizer()
  rows = ft.pack_rows([ft.encode_pair(tok, p, r) for p, r in PAIRS], seq_len=32)
  assert len(rows['inputs']) == 4
  batch = {k: np.tile(v, (2, 1)) for k, v in rows.items()}
  loaded = engine.load(str(tmp_path / 'pre'))
  with Checkpointer(str(tmp_path / 'pre'), loaded.cfg.checkpoint, read_only=True) as ckpt:
    params5, _ = ckpt.restore(5, loaded.setup.abstract_state, params_only=True)
  start = {10: loaded.setup.eval_loss(loaded.params, [batch]),
           5: loaded.setup.eval_loss(params5, [batch])}
  random_init = loaded.setup.eval_loss(loaded.setup.init_state().params, [batch])
  assert abs(start[10] - random_init) > 0.3 and abs(start[5] - start[10]) > 1e-3, (start, random_init)

  out = tmp_path / 'sft'
  assert cli.main(['finetune', f'--workdir={out}', f'--init_from={tmp_path / "pre"}',
                   f'--data={data}', '--steps=30', '--batch_size=8', '--lr=3e-3',
                   '--warmup_steps=2', '--log_every=10']) == 0
  losses = _sft_losses(out)
  assert sorted(losses) == [1, 10, 20, 30]
  assert losses[1] == pytest.approx(start[10], rel=1e-5)  # the latest pretrained params
  assert losses[30] < 0.7 * losses[1], losses  # 5.19 -> 3.01 when written
  saved = json.loads((out / 'config.json').read_text())
  assert saved['train']['steps'] == 30 and saved['optim']['lr'] == 3e-3
  assert (out / 'checkpoints' / '30').is_dir()

  # --restore_step picks the earlier checkpoint, for finetune and for convert --to_hf; an
  # HF directory exported from step 5 starts a fine-tune from the same params.
  one_step = [f'--data={data}', '--steps=1', '--batch_size=8', '--seq_len=32']
  assert cli.main(['finetune', f'--workdir={tmp_path / "sft5"}', f'--init_from={tmp_path / "pre"}',
                   '--restore_step=5', *one_step]) == 0
  assert _sft_losses(tmp_path / 'sft5')[1] == pytest.approx(start[5], rel=1e-5)
  assert cli.main(['convert', f'--to_hf={tmp_path / "hf5"}', f'--workdir={tmp_path / "pre"}',
                   '--restore_step=5']) == 0
  assert cli.main(['finetune', f'--workdir={tmp_path / "sft_hf"}', f'--init_from={tmp_path / "hf5"}',
                   *one_step]) == 0
  assert _sft_losses(tmp_path / 'sft_hf')[1] == pytest.approx(start[5], rel=1e-5)


def test_finetune_errors_are_one_line(tmp_path, capsys):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "x"}\n')
  assert cli.main(['finetune', f'--workdir={tmp_path / "o"}', f'--init_from={tmp_path}',
                   f'--data={bad}']) == 2
  assert 'line 1' in capsys.readouterr().err


def test_finetune_sigterm_exits_75_resumes_and_scores_eval_data(tiny_cfg, tmp_path, repo):
  """The fine-tune is the train loop: SIGTERM -> checkpoint + exit 75, rerun -> resume,
  --eval_data -> eval/loss on held-out pairs."""
  import signal  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  tiny_cfg.checkpoint.async_save = False
  tiny_cfg.train.steps = 4
  Trainer(tiny_cfg, str(tmp_path / 'pre')).run()
  data, val = tmp_path / 'pairs.jsonl', tmp_path / 'val.jsonl'
  data.write_text(''.join(json.dumps({'prompt': p, 'response': r}) + '\n' for p, r in PAIRS))
  val.write_text(json.dumps({'prompt': 'Q: 3+3?\nA:', 'response': ' six'}) + '\n')
  out = tmp_path / 'sft'
  argv = [sys.executable, '-m', 'jaxlm', 'finetune', f'--workdir={out}',
          f'--init_from={tmp_path / "pre"}', f'--data={data}', f'--eval_data={val}',
          '--steps=400', '--batch_size=8', '--seq_len=32', '--log_every=200']
  env = {**os.environ, 'XLA_FLAGS': ''}  # one CPU device: the fastest steps
  proc = subprocess.Popen(argv, cwd=repo, stderr=subprocess.PIPE, text=True, env=env)
  err = []
  for line in proc.stderr:  # the first step's line: compiled and training
    err.append(line)
    if 'step 1/400' in line:
      proc.send_signal(signal.SIGTERM)
      break
  err += proc.stderr.readlines()
  assert proc.wait(timeout=300) == 75, ''.join(err)
  stopped = [int(p.name) for p in (out / 'checkpoints').iterdir() if p.name.isdigit()]
  assert stopped and max(stopped) < 400, stopped

  done = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600, env=env)
  assert done.returncode == 0, done.stderr
  assert f'resume: restoring step {max(stopped)}' in done.stderr
  rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['step'] == 400 and np.isfinite(rows[-1]['eval/loss'])
  assert 'step 400/400 | eval/loss' in done.stderr
