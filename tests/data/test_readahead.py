"""ReadAheadBatches: Grain's batch(), read concurrently and ahead, gives the same batches."""

import grain
import numpy as np

from jaxlm.data import readahead
from jaxlm.data.packing import Windows
from jaxlm.data.sources import TokenStore


class _Batched(Windows):
  """Windows that count batched reads (to see the batch is asked for in one call)."""
  calls = 0

  def _getitems(self, indices):
    type(self).calls += 1
    return super()._getitems(indices)


def _windows():
  tokens = np.arange(5000, dtype=np.int32) % 251
  doc_ids = np.repeat(np.arange(50, dtype=np.int32), 100)
  return _Batched(TokenStore(tokens, doc_ids, 50, 0, 'test'), seq_len=16)


def test_same_batches_as_grain_in_any_order_and_after_pickling():
  import pickle
  ds = grain.MapDataset.source(_windows()).shuffle(seed=3).repeat()
  want = ds.batch(8, drop_remainder=True)
  got = readahead.ReadAheadBatches(ds, 8, ahead=2)
  order = [0, 1, 2, 5, 3, 9, 7, 7, 100, 4]  # forward, strided, backward, repeated
  for k in order:
    w, g = want[k], got[k]
    assert w.keys() == g.keys()
    for key in w:
      np.testing.assert_array_equal(w[key], g[key])
  clone = pickle.loads(pickle.dumps(got))
  for key in want[11]:
    np.testing.assert_array_equal(want[11][key], clone[11][key])
  got.close()


def test_a_batch_is_one_batched_read_and_the_next_ones_are_read_ahead():
  ds = grain.MapDataset.source(_windows())
  got = readahead.ReadAheadBatches(ds, 4, ahead=2)
  _Batched.calls = 0
  got[0]
  got._pending[2].result()  # batches 1 and 2 were started before being asked for
  assert sorted(got._pending) == [1, 2] and _Batched.calls == 3  # one read per batch
  got.close()
