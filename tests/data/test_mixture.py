"""data.mixture: weighted, deterministic mixing of prepared stores; exact resume with workers."""

import json

import numpy as np
import pytest

from _data_cfg import SHAKESPEARE, make_cfg
from jaxlm.core import config as config_lib
from jaxlm.core.errors import ConfigError
from jaxlm.data import mixture
from jaxlm.data.pipeline import DataPipeline
from jaxlm.data.prepare import prepare
from jaxlm.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
SEQ = 16


@pytest.fixture(scope='module')
def stores(tmp_path_factory):
  """Two `jaxlm prepare` stores: Shakespeare lines (big) and Chinese/English JSONL (tiny)."""
  root = tmp_path_factory.mktemp('mix')
  (root / 'web.txt').write_text(SHAKESPEARE.read_text()[:20_000])
  prepare(str(root / 'web.txt'), root / 'web', text_unit='line', docs_per_shard=200)
  docs = [f'第{i}号文档 doc {i}' for i in range(25)]
  (root / 'zh.jsonl').write_text('\n'.join(json.dumps({'text': d}) for d in docs) + '\n')
  prepare(str(root / 'zh.jsonl'), root / 'zh', fmt='jsonl', docs_per_shard=10)
  return str(root / 'web'), str(root / 'zh')


def _pipe(stores, weights=(0.75, 0.25), **data):
  spec = ','.join(f'{p}:{w}' for p, w in zip(stores, weights))
  return DataPipeline(make_cfg(source='arrayrecord', mixture=spec, **data), TOK)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _origin(pipe, split='train'):
  """Window inputs (as bytes) -> index of the source that holds that window."""
  return {getattr(s, split)[i]['inputs'].tobytes(): k
          for k, s in enumerate(pipe.sources) for i in range(len(getattr(s, split)))}


def test_weights_and_determinism(stores):
  pipe = _pipe(stores)
  assert [s.name for s in pipe.sources] == list(stores) and len(pipe.sources[1].train) < 40
  origin = _origin(pipe)
  batches = _take(pipe.train_iterator(), 50)  # the small source cycles more than once
  rows = [origin[r.tobytes()] for b in batches for r in b['inputs']]
  assert rows.count(1) == len(rows) // 4  # Grain interleaves 3:1 exactly
  _assert_same(batches[:5], _take(_pipe(stores).train_iterator(), 5))
  other = _take(_pipe(stores, seed=1).train_iterator(), 5)
  assert not all(np.array_equal(a['inputs'], b['inputs']) for a, b in zip(batches, other))
  # The smaller source's share bounds an epoch: 25% of windows come from its few windows.
  assert pipe.steps_per_epoch == len(pipe.sources[1].train) * 4 // pipe.global_batch


def test_kill_and_resume_with_workers_matches_uninterrupted(stores):
  expected = _take(_pipe(stores).train_iterator(), 45)
  it = _pipe(stores, worker_count=2).train_iterator()
  try:
    first = _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  finally:
    it.close()  # the loader and its workers go away mid-epoch
  assert len(json.dumps(state)) < 1000
  _assert_same(first, expected[:5])
  resumed = _pipe(stores, worker_count=2).train_iterator()  # a fresh process would rebuild this
  try:
    resumed.set_state(state)
    _assert_same(_take(resumed, 40), expected[5:])
  finally:
    resumed.close()


def test_eval_mixes_validation_splits(stores):
  pipe = _pipe(stores, weights=(1, 1))
  pipe.cfg.eval.batches = 4  # 16 rows: more than the small source's validation windows
  assert len(pipe.sources[1].val) < 8
  batches = pipe.eval_batches()
  origin = _origin(pipe, 'val')
  rows = [origin[r.tobytes()] for b in batches for r in b['inputs']]
  assert rows == [0, 1] * 8
  _assert_same(batches[:3], _pipe(stores, weights=(1, 1), seed=3).eval_batches())


def test_parse_and_config():
  assert mixture.parse('a/b:0.7, c:d/e:0.3') == [('a/b', 0.7), ('c:d/e', 0.3)]
  for bad in ('a', 'a:0', 'a:-1', 'a:x', ':1', ','):
    with pytest.raises(ConfigError, match='data.mixture'):
      mixture.parse(bad)
  cfg = make_cfg(mixture='a:1')
  cfg.model.max_seq_len = SEQ
  config_lib.validate(cfg)  # data.path may stay empty when data.mixture is set
