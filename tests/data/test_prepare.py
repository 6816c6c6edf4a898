"""`jaxlm prepare`: corpus -> ArrayRecord store that decodes back, resumes, counts bad records."""

import json
import os
import types

import jax
import numpy as np
import pytest

from _data_cfg import SHAKESPEARE, make_cfg
from conftest import load_config
from jaxlm.cli import main as cli
from jaxlm.core.errors import DataError
from jaxlm.data import prepare as prepare_lib
from jaxlm.data.pipeline import DataPipeline
from jaxlm.data.sources import open_tokens
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.run.loop import Trainer

ZH_EN = ['今天天气很好，我们去公园散步吧。', 'Machine learning 是人工智能的一个分支。',
         'The quick brown fox 跳过了 the lazy dog.', '我喜欢读书 and writing code 😀',
         'line one\nline two 第二行', '北京', 'tail']
# Each bad line, and the kind `jaxlm prepare` must count it as.
BAD = [(b'\xff\xfe not utf-8', 'invalid_utf8'), (b'', 'empty'), (b'{"text": "  "}', 'empty'),
       (b'{"text": "unterminated', 'malformed_json'),
       (b'{"body": "no text field"}', 'missing_field'),
       (b'{"text": 7}', 'missing_field'), (b'["text"]', 'missing_field')]


def _jsonl(path):
  """ZH_EN as JSON lines with a BAD line after every good one (the last BAD lines trail)."""
  lines = []
  for i, doc in enumerate(ZH_EN):
    lines.append(json.dumps({'text': doc, 'id': i}, ensure_ascii=False).encode('utf-8'))
    if i < len(BAD):
      lines.append(BAD[i][0])
  path.write_bytes(b'\n'.join(lines) + b'\n')
  return path


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  """A 512-token byte-level BPE trained by `jaxlm tokenizer train` on ~200KB."""
  folder = tmp_path_factory.mktemp('tok')
  (folder / 'zh_en.txt').write_text('\n'.join(ZH_EN * 200), encoding='utf-8')
  assert cli.main(['tokenizer', 'train', f'--input={folder / "zh_en.txt"},{SHAKESPEARE}',
                   '--vocab_size=512', '--max_bytes=200000', f'--output={folder}']) == 0
  return str(folder / 'tokenizer.json')


def _prepare(*flags):
  return cli.main(['prepare', '--progress=false', *flags])


def test_shakespeare_with_workers_decodes_back(bpe, tmp_path):
  out = tmp_path / 'store'
  assert _prepare(f'--input={SHAKESPEARE}', f'--output={out}', '--tokenizer=hf',
                  f'--tokenizer_path={bpe}', '--text_unit=line', '--docs_per_shard=15000',
                  '--workers=2') == 0
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['complete'] and manifest['dtype'] == 'uint16'
  assert [s['file'] for s in manifest['shards']] == [f'shard-0000{i}.tokens' for i in range(3)]
  assert manifest['tokenizer']['kind'] == 'hf' and manifest['tokenizer']['sha256']
  assert manifest['bad_records'] == {'empty': 7223}  # tinyshakespeare's blank lines
  lines = [l for l in SHAKESPEARE.read_text().split('\n') if l.strip()]
  assert manifest['docs'] == len(lines) == sum(s['docs'] for s in manifest['shards'])

  cfg = make_cfg(source='arrayrecord', path=str(out), tokenizer='hf', tokenizer_path=bpe,
                 shuffle=False, add_eos=False, seq_len=64)
  cfg.train.batch_size = 8
  pipe = DataPipeline(cfg, get_tokenizer(cfg.data))
  assert len(pipe.store) == manifest['tokens']
  batch = next(pipe.train_iterator())
  # Unshuffled rows are consecutive windows: together, the corpus's first 8 * 64 tokens.
  text = pipe.tokenizer.decode(batch['inputs'].reshape(-1))
  assert len(text) > 500 and text == ''.join(lines)[:len(text)]


def test_bad_records_resume_and_specials(bpe, tmp_path, capsys):
  src, out = _jsonl(tmp_path / 'zh_en.jsonl'), tmp_path / 'store'
  args = [f'--input={src}', '--format=jsonl', f'--output={out}', '--tokenizer=hf',
          f'--tokenizer_path={bpe}', '--docs_per_shard=3', '--workers=0', '--add_eos']
  assert _prepare(*args) == 0
  assert 'prepared' in capsys.readouterr().out
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['bad_records'] == {'invalid_utf8': 1, 'empty': 2, 'malformed_json': 1,
                                     'missing_field': 3}
  assert [s['docs'] for s in manifest['shards']] == [3, 3, 1]
  tok = get_tokenizer(types.SimpleNamespace(tokenizer='hf', tokenizer_path=bpe))
  # The store holds EOS already, so data.add_eos=True must not add a second one.
  store = open_tokens(make_cfg(source='arrayrecord', path=str(out), tokenizer='hf',
                               tokenizer_path=bpe, add_eos=True).data, tok)
  tokens, starts = store.read(0, len(store))
  docs = np.split(tokens, starts)
  assert [tok.decode(d) for d in docs] == ZH_EN
  assert all(d[-1] == tok.eos_id and tok.eos_id not in d[:-1] for d in docs)

  # A kill mid-run: shard 1 lost before its rename, a stale temp file left behind.
  (out / 'shard-00001.tokens').rename(out / 'shard-00001.tokens.partial')
  before = {f: os.stat(out / f).st_mtime_ns for f in ('shard-00000.tokens', 'shard-00002.tokens')}
  assert _prepare(*args) == 0
  assert '3 shards (2 already done)' in capsys.readouterr().out
  assert before == {f: os.stat(out / f).st_mtime_ns for f in before}
  assert not list(out.glob('*.partial'))
  assert json.loads((out / 'manifest.json').read_text())['shards'] == manifest['shards']

  assert _prepare(*args[:-1]) == 2  # same output, different settings (no --add_eos)
  assert "holds a store prepared with different add_eos" in capsys.readouterr().err


def test_incomplete_store_is_refused(tmp_path):
  (tmp_path / 'a.txt').write_text('hello world')
  prepare_lib.prepare(str(tmp_path / 'a.txt'), tmp_path / 'store')
  manifest = json.loads((tmp_path / 'store' / 'manifest.json').read_text())
  manifest['complete'] = False
  (tmp_path / 'store' / 'manifest.json').write_text(json.dumps(manifest))
  with pytest.raises(DataError, match='partly written store'):
    open_tokens(make_cfg(source='arrayrecord', path=str(tmp_path / 'store')).data,
                get_tokenizer(make_cfg().data))


def test_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({'content': ['alpha', None, 'βeta', '  ']}), tmp_path / 'a.parquet')
  pq.write_table(pa.table({'other': ['x', 'y']}), tmp_path / 'b.parquet')
  m = prepare_lib.prepare(str(tmp_path / '*.parquet'), tmp_path / 'store', fmt='parquet',
                          field='content')
  assert m['docs'] == 2 and m['tokens'] == len('alphaβeta'.encode())
  assert m['bad_records'] == {'empty': 1, 'missing_field': 3}


def test_errors(tmp_path, capsys):
  assert _prepare(f'--output={tmp_path}') == 2
  assert 'needs --input' in capsys.readouterr().err
  assert _prepare(f'--input={tmp_path}/none*', f'--output={tmp_path}/o') == 2
  assert "'" + f'{tmp_path}/none*' + "' matched no files" in capsys.readouterr().err
  assert _prepare(f'--input={SHAKESPEARE}', f'--output={tmp_path}/o', '--tokenizer=hf',
                  f'--tokenizer_path={tmp_path}/missing.json') == 2
  assert "--tokenizer_path '" in capsys.readouterr().err


def test_train_steps_from_prepared_store(bpe, tmp_path):
  text = SHAKESPEARE.read_text()[:40_000]
  (tmp_path / 'small.txt').write_text(text)
  store = tmp_path / 'store'
  prepare_lib.prepare(str(tmp_path / 'small.txt'), store, tokenizer='hf', tokenizer_path=bpe,
                      text_unit='line')
  cfg = load_config('tiny')
  cfg.model.vocab_size = 512
  cfg.data.source, cfg.data.path = 'arrayrecord', str(store)
  cfg.data.tokenizer, cfg.data.tokenizer_path = 'hf', bpe
  cfg.train.steps, cfg.eval.every, cfg.checkpoint.every = 4, 0, 0
  out = Trainer(cfg, str(tmp_path / 'run'), devices=jax.devices()[:1]).run()
  assert out['step'] == 4 and np.isfinite(out['eval/loss'])
