import numpy as np
import pytest

from _data_cfg import SHAKESPEARE, make_cfg
from jaxlm.data.packing import BATCH_KEYS, Windows, num_windows, pack_window, train_val_split
from jaxlm.data.sources import TokenStore, load_tokens
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.errors import DataError


def _store(doc_lengths):
  doc_ids = np.repeat(np.arange(len(doc_lengths), dtype=np.int32), doc_lengths)
  tokens = np.arange(10, 10 + len(doc_ids), dtype=np.int32)
  return TokenStore(tokens, doc_ids, len(doc_lengths), 0, 'test')


def test_pack_window_across_documents():
  # Stream: doc 7 = [10 11 12], doc 8 = [13 14], doc 9 = [15 16 17 18]; seq_len 8.
  tokens = np.arange(10, 19)
  doc_ids = np.array([7, 7, 7, 8, 8, 9, 9, 9, 9])
  w = pack_window(tokens, doc_ids, 8)
  np.testing.assert_array_equal(w['inputs'], [10, 11, 12, 13, 14, 15, 16, 17])
  np.testing.assert_array_equal(w['targets'], [11, 12, 13, 14, 15, 16, 17, 18])
  np.testing.assert_array_equal(w['segment_ids'], [1, 1, 1, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(w['positions'], [0, 1, 2, 0, 1, 0, 1, 2])
  # 12 -> 13 and 14 -> 15 would cross a document boundary.
  np.testing.assert_array_equal(w['loss_mask'], [1, 1, 0, 1, 0, 1, 1, 1])
  assert {k: w[k].dtype for k in BATCH_KEYS} == {
      'inputs': np.int32, 'targets': np.int32, 'segment_ids': np.int32,
      'positions': np.int32, 'loss_mask': np.float32}
  assert all(w[k].shape == (8,) for k in BATCH_KEYS)


def test_pack_window_padding():
  w = pack_window(np.array([5, 6, 7, 8]), np.array([3, 3, 4, 4]), 6)
  # The last real token is an input whose target is padding: in its segment, but unmasked.
  np.testing.assert_array_equal(w['inputs'], [5, 6, 7, 8, 0, 0])
  np.testing.assert_array_equal(w['targets'], [6, 7, 8, 0, 0, 0])
  np.testing.assert_array_equal(w['segment_ids'], [1, 1, 2, 2, 0, 0])
  np.testing.assert_array_equal(w['positions'], [0, 1, 0, 1, 0, 0])
  np.testing.assert_array_equal(w['loss_mask'], [1, 0, 1, 0, 0, 0])


def test_windows_tile_the_stream():
  store = _store([5, 9, 3])  # 17 tokens, 16 next-token pairs
  windows = Windows((store.tokens, store.doc_ids), seq_len=6)
  assert len(windows) == num_windows(17, 6) == 3
  # A document continuing from the previous window restarts at segment 1, position 0.
  w1 = windows[1]
  np.testing.assert_array_equal(w1['inputs'], store.tokens[6:12])
  np.testing.assert_array_equal(w1['segment_ids'], [1] * 6)
  np.testing.assert_array_equal(w1['positions'], np.arange(6))
  # Every next-token pair of the stream appears exactly once (last window padded).
  pairs = [(i, t) for w in (windows[k] for k in range(3))
           for i, t, m in zip(w['inputs'], w['targets'], w['loss_mask']) if m]
  same_doc = store.doc_ids[:-1] == store.doc_ids[1:]
  assert pairs == [p for p, keep in zip(zip(store.tokens[:-1], store.tokens[1:]), same_doc) if keep]
  assert windows[2]['segment_ids'].tolist() == [1, 1, 2, 2, 2, 0]
  assert windows[2]['loss_mask'].tolist() == [1, 0, 1, 1, 0, 0]
  with pytest.raises(IndexError):
    windows[3]


def test_num_windows_edges():
  assert [num_windows(n, 4) for n in (0, 1, 2, 5, 6, 9)] == [0, 0, 1, 1, 2, 2]


def test_shakespeare_split_is_first_90_percent():
  text = SHAKESPEARE.read_text(encoding='utf-8')
  cfg = make_cfg(path=str(SHAKESPEARE), add_eos=False)
  tok = ByteTokenizer()
  train, val = train_val_split(load_tokens(cfg.data, tok), cfg.data.val_fraction)
  n = len(text)  # all ASCII, so bytes == characters
  assert tok.decode(train[0]) == text[:int(n * 0.9)]
  assert tok.decode(val[0]) == text[int(n * 0.9):]
  assert (train[1] == 0).all() and (val[1] == 0).all()


def test_split_edges():
  store = _store([10, 10])
  train, val = train_val_split(store, 0.0)
  assert len(train[0]) == 20 and len(val[0]) == 0
  train, val = train_val_split(store, 0.25)
  np.testing.assert_array_equal(np.concatenate([train[0], val[0]]), store.tokens)
  assert len(val[0]) == 5
  for bad in (-0.1, 1.0):
    with pytest.raises(DataError, match='data.val_fraction'):
      train_val_split(store, bad)
