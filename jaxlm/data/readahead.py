"""Batches of windows read concurrently and ahead, for token stores on object storage.

A window from a gs:// or s3:// store is one ranged GET that answers in tens of
milliseconds; read one after another, a gpt2_small batch (512 rows) would take
seconds. `ReadAheadBatches` stands where Grain's `batch()` would: the rows of
batch k are asked for in one call (Grain's batched `_getitems`, down to
`packing.Windows._getitems`, where a remote store sends all their ranged GETs
at once), and batches k + s .. k + ahead * s are started, each on a thread of
its own, before they are asked for (s: the step between the two latest
requests, 1 in the train loop, the worker count inside a Grain worker), so a
step's rows are in memory before the step needs them.

What a batch holds depends only on its index (rows are read from the same
parent dataset and stacked as Grain's `batch()` stacks them), so iterator state,
resume and the batches themselves are unchanged; only timing differs. Memory:
at most `ahead + 1` batches in flight per dataset, each on its own thread.
"""

import concurrent.futures as futures
import threading
from typing import Dict, List

import grain
import numpy as np


def _stack(rows: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class ReadAheadBatches(grain.MapDataset):
  """`parent.batch(batch_size, drop_remainder=True)`, with rows read by a thread pool, ahead.

  Args:
    parent: a MapDataset of `packing.pack_window` dicts.
    batch_size: rows per batch.
    ahead: batches started before they are asked for.
  """

  def __init__(self, parent: grain.MapDataset, batch_size: int, ahead: int):
    super().__init__(parent)
    self._batch, self._ahead = batch_size, ahead
    self._init_runtime()

  def _init_runtime(self):
    self._pool = None  # started on first use, per process
    self._lock = threading.Lock()
    self._pending: Dict[int, futures.Future] = {}
    self._last = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items()
            if k not in ('_pool', '_lock', '_pending', '_last')}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_runtime()

  def __len__(self) -> int:
    return len(self._parent) // self._batch

  def __str__(self) -> str:
    return f'ReadAheadBatches(batch={self._batch}, ahead={self._ahead})'

  def _read(self, k: int) -> Dict[str, np.ndarray]:
    rows = self._parent._getitems(range(k * self._batch, (k + 1) * self._batch))  # noqa: SLF001
    return _stack(list(rows))

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k = int(index)
    with self._lock:
      if self._pool is None:
        self._pool = futures.ThreadPoolExecutor(self._ahead + 1, thread_name_prefix='jaxlm-read')
      stride = k - self._last if self._last is not None and k > self._last else 1
      self._last = k
      wanted = [k + a * stride for a in range(self._ahead + 1)]
      for j in [j for j in self._pending if j not in wanted]:
        self._pending.pop(j).cancel()
      for j in wanted:
        if j not in self._pending and j < len(self):
          self._pending[j] = self._pool.submit(self._read, j)
      batch = self._pending.pop(k)
    return batch.result()

  def close(self) -> None:
    """Stops the reader threads (batches in flight are dropped)."""
    with self._lock:
      for f in self._pending.values():
        f.cancel()
      self._pending.clear()
      if self._pool is not None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
