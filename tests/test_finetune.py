"""jaxlm.finetune: response-only loss mask, packing, and a fine-tune whose loss falls."""

import json

import numpy as np

from jaxlm import cli
from jaxlm import finetune as ft
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.train.loop import Trainer

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


def test_finetune_from_a_pretrained_run_lowers_response_loss(tiny_cfg, tmp_path):
  tiny_cfg.checkpoint.async_save = False
  tiny_cfg.train.steps = 10
  Trainer(tiny_cfg, str(tmp_path / 'pre')).run()
  data = tmp_path / 'pairs.jsonl'
  data.write_text(''.join(json.dumps({'prompt': p, 'response': r}) + '\n' for p, r in PAIRS))
  out = tmp_path / 'sft'
  assert cli.main(['finetune', f'--workdir={out}', f'--init_from={tmp_path / "pre"}',
                   f'--data={data}', '--steps=30', '--batch_size=8', '--lr=3e-3',
                   '--warmup_steps=2', '--log_every=10']) == 0
  lines = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
  losses = {l['step']: l['train/loss'] for l in lines}
  assert sorted(losses) == [1, 10, 20, 30]
  assert losses[30] < 0.7 * losses[1], losses  # 5.19 -> 3.01 when written
  saved = json.loads((out / 'config.json').read_text())
  assert saved['train']['steps'] == 30 and saved['optim']['lr'] == 3e-3
  assert (out / 'checkpoints' / '30').is_dir()


def test_finetune_errors_are_one_line(tmp_path, capsys):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "x"}\n')
  assert cli.main(['finetune', f'--workdir={tmp_path / "o"}', f'--init_from={tmp_path}',
                   f'--data={bad}']) == 2
  assert 'line 1' in capsys.readouterr().err
