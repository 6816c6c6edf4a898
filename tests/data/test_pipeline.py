import itertools
import json

import numpy as np
import pytest

from _data_cfg import make_cfg
from jaxlm.core.errors import DataError
from jaxlm.data.packing import BATCH_KEYS
from jaxlm.data.pipeline import DataPipeline, make_pipeline
from jaxlm.data.sources import TokenStore
from jaxlm.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
SEQ = 16


def _store(n_tokens=2000, doc_len=37):
  """Tokens are their own stream index, so a batch row says which window it is."""
  tokens = np.arange(n_tokens, dtype=np.int32)
  doc_ids = (np.arange(n_tokens) // doc_len).astype(np.int32)
  return TokenStore(tokens, doc_ids, int(doc_ids[-1]) + 1, 0, 'synthetic')


def _pipe(store=None, process_index=0, process_count=1, batch_size=4, eval_batch_size=0, **data):
  cfg = make_cfg(**data)
  cfg.train.batch_size = batch_size
  cfg.eval.batch_size = eval_batch_size
  return DataPipeline(cfg, TOK, process_index, process_count, store=store or _store())


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_shapes_and_content():
  pipe = _pipe(shuffle=False)
  batch = next(pipe.train_iterator())
  assert sorted(batch) == sorted(BATCH_KEYS)
  assert all(batch[k].shape == (4, SEQ) for k in BATCH_KEYS)
  assert batch['inputs'].dtype == np.int32 and batch['loss_mask'].dtype == np.float32
  # Unshuffled, row r is window r: stream tokens [r * SEQ, r * SEQ + SEQ].
  stream = pipe.store.tokens
  for r in range(4):
    np.testing.assert_array_equal(batch['inputs'][r], stream[r * SEQ:(r + 1) * SEQ])
    np.testing.assert_array_equal(batch['targets'][r], stream[r * SEQ + 1:(r + 1) * SEQ + 1])


def test_make_pipeline_reads_config(tmp_path):
  (tmp_path / 'a.txt').write_text('some text ' * 100)
  cfg = make_cfg(path=str(tmp_path / 'a.txt'))
  cfg.train.batch_size = 2
  pipe = make_pipeline(cfg)
  assert pipe.tokenizer.name == 'byte' and len(pipe.store) == 1001
  assert next(pipe.train_iterator())['inputs'].shape == (2, SEQ)


def test_deterministic_and_seeded():
  run = lambda seed: _take(_pipe(seed=seed).train_iterator(), 5)
  a, b, c = run(0), run(0), run(1)
  _assert_same(a, b)
  assert not all(np.array_equal(x['inputs'], y['inputs']) for x, y in zip(a, c))


def test_epochs_reshuffle_and_cover_every_window():
  pipe = _pipe(batch_size=5)  # 124 train windows -> 24 full batches, 4 left over
  n = len(pipe.train_windows)
  batches = _take(pipe.train_iterator(), -(-2 * n // 5))
  # Window w starts at stream token w * SEQ; the stream of windows spans batch boundaries.
  order = np.concatenate([b['inputs'][:, 0] // SEQ for b in batches])
  epoch0, epoch1 = order[:n], order[n:2 * n]
  assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(n))
  assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize('prefetch', [0, 3])
def test_resume_from_state(prefetch):
  pipe = _pipe(prefetch=prefetch)
  it = pipe.train_iterator()
  _take(it, 7)
  state = it.get_state()
  assert json.loads(json.dumps(state)) == state
  expected = _take(it, 40)  # crosses an epoch boundary (24 global batches per epoch)
  fresh = pipe.train_iterator()
  fresh.set_state(state)
  _assert_same(_take(fresh, 40), expected)


def test_reader_threads_give_the_same_batches():
  _assert_same(_take(_pipe(prefetch=3).train_iterator(), 30),
               _take(_pipe(prefetch=0).train_iterator(), 30))


def test_process_rows_concatenate_to_global_batch():
  one = _take(_pipe(batch_size=8).train_iterator(), 20)
  parts = [_take(_pipe(batch_size=8, process_index=p, process_count=2).train_iterator(), 20)
           for p in range(2)]
  assert parts[0][0]['inputs'].shape == (4, SEQ)
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)]
  _assert_same(joined, one)
  evals = [_pipe(batch_size=8, process_index=p, process_count=2).eval_batches() for p in range(2)]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*evals)]
  _assert_same(joined, _pipe(batch_size=8).eval_batches())


def test_workers_match_in_process_and_resume():
  pipe = _pipe(worker_count=2)
  it = pipe.train_iterator()
  try:
    first = _take(it, 5)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state
    expected = _take(it, 6)
  finally:
    it.close()
  _assert_same(first + expected, _take(_pipe().train_iterator(), 11))
  fresh = pipe.train_iterator()
  try:
    fresh.set_state(state)
    _assert_same(_take(fresh, 6), expected)
  finally:
    fresh.close()


def test_eval_batches_fixed_and_wrapping():
  pipe = _pipe(eval_batch_size=6)
  n_val = len(pipe.val_windows)  # 200 val tokens -> 13 windows; 3 batches of 6 wrap around
  assert n_val == 13
  batches = pipe.eval_batches()
  assert len(batches) == 3 and batches[0]['inputs'].shape == (6, SEQ)
  _assert_same(batches, pipe.eval_batches())
  _assert_same(batches, _pipe(eval_batch_size=6, seed=5).eval_batches())
  rows = list(itertools.chain.from_iterable(b['inputs'] for b in batches))
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(row, pipe.val_windows[i % n_val]['inputs'])


def test_errors():
  with pytest.raises(DataError, match='fewer than one global batch of train.batch_size 200'):
    _pipe(batch_size=200)
  with pytest.raises(DataError, match='train.batch_size 6 must be a positive multiple of the '
                     'process count 4'):
    _pipe(batch_size=6, process_count=4)
  with pytest.raises(DataError, match='eval.batch_size 3'):
    _pipe(eval_batch_size=3, process_count=2).eval_batches()
  with pytest.raises(DataError, match='validation split is empty'):
    _pipe(val_fraction=0.0).eval_batches()
  with pytest.raises(DataError, match='process_index 2'):
    _pipe(process_index=2, process_count=2)
