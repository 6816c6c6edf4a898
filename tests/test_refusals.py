"""A refused train / finetune / convert --from_hf leaves its workdir as it was.

Each refusal is one ``jaxlm: error:`` line and exit 2; afterwards the workdir is
byte-for-byte what it was (or still absent), and the corrected command runs.
"""

import json
import os
import socket
import time

import pytest

from jaxlm.cli import main as cli

TRAIN = ['train', '--config=tiny', '--config.train.steps=2', '--config.train.progress=False',
         '--config.eval.every=0', '--config.checkpoint.every=0']


def snapshot(path) -> dict | None:
  """{relative path: bytes} of every file (and None per directory), or None if absent."""
  if not os.path.lexists(path):
    return None
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path) + '/'] = None
    for f in files:
      full = os.path.join(root, f)
      with open(full, 'rb') as fh:
        out[os.path.relpath(full, path)] = fh.read()
  return out


def refused(argv, capsys, *want) -> str:
  """Runs ``argv``: exit 2 with one error line holding each of ``want``."""
  capsys.readouterr()
  assert cli.main(argv) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if 'jaxlm: error:' in line or
         'Traceback' in line]
  assert len(err) == 1, err
  for w in want:
    assert w in err[0], err[0]
  return err[0]


def test_train_refusals_leave_the_workdir_and_the_corrected_command_runs(tmp_path, tiny_cfg,
                                                                        capsys):
  w = tmp_path / 'w'
  data = f'--config.data.path={tiny_cfg.data.path}'
  base = TRAIN + [data, f'--workdir={w}']
  # The cases, on the 8 devices the tests run with, into a workdir not yet there.
  refused(base + ['--config.train.batch_size=12', '--config.mesh.data=8'], capsys,
          'train.batch_size=12', 'does not divide over 8')
  assert snapshot(w) is None
  refused(base + ['--config.mesh.fsdp=8', '--config.mesh.data=1', '--config.model.d_model=30',
                  '--config.model.n_heads=3', '--config.model.n_kv_heads=3'], capsys,
          'parameter', '(320, 30)', 'mesh.fsdp=8')
  assert snapshot(w) is None
  refused(TRAIN + [f'--workdir={w}', f'--config.data.path={tmp_path / "missing.txt"}'], capsys,
          'missing.txt')
  assert snapshot(w) is None
  refused(base + ['--config.model.vocab_size=128'], capsys, '--config.model.vocab_size=384')
  assert snapshot(w) is None

  assert cli.main(base + ['--config.train.batch_size=8', '--config.mesh.data=8']) == 0
  before = snapshot(w)
  assert 'checkpoints/' in before and 'config.json' in before
  # Refusals on a workdir that holds a run change none of its bytes.
  refused(base + ['--config.train.batch_size=8', '--config.model.d_model=48'], capsys,
          'different config', 'model.d_model')
  assert snapshot(w) == before
  refused(base + ['--config.train.batch_size=8', '--config.mesh.tensor=8',
                  '--config.mesh.data=1'], capsys, 'does not divide over mesh.tensor=8')
  assert snapshot(w) == before
  # A live holder of the lock (this process, on this host).
  lock = {'host': socket.gethostname(), 'pid': os.getpid(), 'start': time.time(),
          'heartbeat': time.time(), 'token': 'other'}
  (w / 'jaxlm.lock').write_text(json.dumps(lock))
  held = snapshot(w)
  refused(base + ['--config.train.batch_size=8', '--config.mesh.data=8'], capsys, 'in use')
  assert snapshot(w) == held


def test_train_refuses_a_store_prepared_with_another_tokenizer(tmp_path, tiny_cfg, capsys):
  """Same size, other file: the prepared store's manifest sha256 does not match."""
  from jaxlm.data import tokenizer_train  # noqa: PLC0415
  docs = [tiny_cfg.data.path]
  text = open(docs[0]).read()
  a = tokenizer_train.train([text[:30_000]], 'bpe', 300, tmp_path / 'a')
  b = tokenizer_train.train([text[30_000:]], 'bpe', 300, tmp_path / 'b')
  assert cli.main(['prepare', f'--input={docs[0]}', f'--output={tmp_path / "store"}',
                   '--tokenizer=hf', f'--tokenizer_path={a}', '--workers=0',
                   '--progress=False']) == 0
  w = tmp_path / 'w'
  argv = TRAIN + [f'--workdir={w}', '--config.data.source=arrayrecord',
                  f'--config.data.path={tmp_path / "store"}', '--config.data.tokenizer=hf']
  refused(argv + [f'--config.data.tokenizer_path={b}'], capsys, 'different tokenizer file')
  assert snapshot(w) is None
  assert cli.main(argv + [f'--config.data.tokenizer_path={a}']) == 0


@pytest.fixture
def fresh_gpt2(tmp_path):
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('torch')
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=1, n_embd=16, n_head=2, vocab_size=300, n_positions=32))
  model.save_pretrained(str(tmp_path / 'hf'))
  return tmp_path / 'hf'


def test_import_refusals_leave_the_workdir_and_the_corrected_command_runs(tmp_path, fresh_gpt2,
                                                                         capsys):
  w = tmp_path / 'w'
  bad = tmp_path / 'bert'
  bad.mkdir()
  (bad / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
  refused(['convert', f'--from_hf={bad}', f'--workdir={w}'], capsys, "'bert'")
  assert snapshot(w) is None
  refused(['convert', f'--from_hf={tmp_path / "nowhere"}', f'--workdir={w}'], capsys,
          'no config.json')
  assert snapshot(w) is None
  assert cli.main(['convert', f'--from_hf={fresh_gpt2}', f'--workdir={w}']) == 0
  before = snapshot(w)
  refused(['convert', f'--from_hf={fresh_gpt2}', f'--workdir={w}'], capsys,
          'already holds checkpoints')
  assert snapshot(w) == before


def test_finetune_refusals_leave_the_workdir_and_the_corrected_command_runs(tmp_path, fresh_gpt2,
                                                                           capsys):
  w = tmp_path / 'ft'
  pairs = tmp_path / 'pairs.jsonl'
  pairs.write_text('\n'.join(json.dumps({'prompt': f'q{i} ', 'response': f'a{i}'})
                             for i in range(8)) + '\n')
  argv = ['finetune', f'--workdir={w}', '--steps=1', '--batch_size=8', '--seq_len=16']
  refused(argv + [f'--init_from={fresh_gpt2}', f'--data={tmp_path / "none.jsonl"}'], capsys,
          'none.jsonl')
  assert snapshot(w) is None
  refused(argv + [f'--init_from={tmp_path / "nothing"}', f'--data={pairs}'], capsys, 'nothing')
  assert snapshot(w) is None
  refused(argv[:-2] + ['--batch_size=6', '--seq_len=16', f'--init_from={fresh_gpt2}',
                       f'--data={pairs}'], capsys, 'batch_size=6')
  assert snapshot(w) is None
  assert cli.main(argv + [f'--init_from={fresh_gpt2}', f'--data={pairs}']) == 0
  assert (w / 'checkpoints').is_dir()
