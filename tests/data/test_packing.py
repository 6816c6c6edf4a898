import numpy as np
import pytest

from _data_cfg import SHAKESPEARE, make_cfg
from jaxlm.data.packing import (BATCH_KEYS, Windows, doc_starts, num_windows, pack_window,
                                train_tokens)
from jaxlm.core.errors import DataError
from jaxlm.data.sources import TokenStore, load_tokens
from jaxlm.data.tokenizers import ByteTokenizer


def _store(doc_lengths):
  doc_ids = np.repeat(np.arange(len(doc_lengths), dtype=np.int32), doc_lengths)
  tokens = np.arange(10, 10 + len(doc_ids), dtype=np.int32)
  return TokenStore(tokens, doc_ids, len(doc_lengths), 0, 'test')


def test_pack_window_across_documents():
  # Stream: doc 7 = [10 11 12], doc 8 = [13 14], doc 9 = [15 16 17 18]; seq_len 8.
  tokens = np.arange(10, 19)
  doc_ids = np.array([7, 7, 7, 8, 8, 9, 9, 9, 9])
  np.testing.assert_array_equal(doc_starts(doc_ids), [3, 5])
  w = pack_window(tokens, doc_starts(doc_ids), 8)
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
  w = pack_window(np.array([5, 6, 7, 8]), np.array([2]), 6)
  # The last real token is an input whose target is padding: in its segment, but unmasked.
  np.testing.assert_array_equal(w['inputs'], [5, 6, 7, 8, 0, 0])
  np.testing.assert_array_equal(w['targets'], [6, 7, 8, 0, 0, 0])
  np.testing.assert_array_equal(w['segment_ids'], [1, 1, 2, 2, 0, 0])
  np.testing.assert_array_equal(w['positions'], [0, 1, 0, 1, 0, 0])
  np.testing.assert_array_equal(w['loss_mask'], [1, 0, 1, 0, 0, 0])


def test_pack_window_document_starting_at_the_last_target():
  # A document begins at token 4 = seq_len: it is only a target, so it is masked, not a segment.
  w = pack_window(np.array([1, 2, 3, 4, 9]), np.array([2, 4]), 4)
  np.testing.assert_array_equal(w['segment_ids'], [1, 1, 2, 2])
  np.testing.assert_array_equal(w['positions'], [0, 1, 0, 1])
  np.testing.assert_array_equal(w['loss_mask'], [1, 0, 1, 0])
  np.testing.assert_array_equal(w['targets'], [2, 3, 4, 9])


def test_windows_tile_the_stream():
  store = _store([5, 9, 3])  # 17 tokens, 16 next-token pairs
  windows = Windows(store, seq_len=6)
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
  n = len(text)  # all ASCII, so bytes == characters
  assert len(load_tokens(cfg.data, tok)) == n
  # Base's data.val_tokens (4M) is above the 10% cap here, so this is nanoGPT's split.
  assert train_tokens(n, cfg.data.val_tokens, cfg.data.val_fraction) == int(n * 0.9)


def test_split_by_tokens_capped_by_fraction():
  assert train_tokens(20, 5, 0.5) == 15  # val_tokens under the cap: held out as asked
  assert train_tokens(20, 100, 0.25) == 15  # capped: a quarter of the stream
  assert train_tokens(10**12, 4_000_000, 0.1) == 10**12 - 4_000_000
  assert train_tokens(20, 5, 0.0) == 20 and train_tokens(20, 0, 0.5) == 20
  for bad in (-0.1, 1.0):
    with pytest.raises(DataError, match='data.val_fraction'):
      train_tokens(20, 5, bad)
  with pytest.raises(DataError, match='data.val_tokens -1'):
    train_tokens(20, -1, 0.1)


def test_windows_over_a_split():
  store = _store([5, 9, 3])
  val = Windows(store, seq_len=6, lo=11)
  assert len(val) == 1 and val.n_tokens == 6
  # Stream tokens 11..16 (ids 21..26): the end of document 1, then document 2.
  np.testing.assert_array_equal(val[0]['inputs'], [21, 22, 23, 24, 25, 26])
  np.testing.assert_array_equal(val[0]['segment_ids'], [1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(val[0]['loss_mask'], [1, 1, 0, 1, 1, 0])
