"""The input pipeline: tokens -> packed windows -> per-process batches, on Grain.

The global batch at step s is fixed by (data, seq_len, batch size, seed) alone:
its rows are global-stream windows `[s * B, (s + 1) * B)`, where the global
stream is the train windows repeated forever, reshuffled every epoch. Process p
of P reads only rows `[p * B / P, (p + 1) * B / P)` of it, so changing the host
count changes who reads a row, never which rows a step sees.

With data.mixture set, the train windows are a weighted mix of several sources
(`jaxlm.data.mixture`), still one random-access Grain dataset, so all of the
above holds unchanged; eval batches mix every source's validation split in the
same ratio.

Iterator state is Grain's: `{'next_index': batches_already_returned}` with no
workers; with `data.worker_count > 0`, Grain's multiprocess state (a small dict
of per-worker next indices). Both are JSON-serializable and hold no data.
"""

import logging
from typing import Dict, List

import grain
import numpy as np

from jaxlm.core import config as config_lib
from jaxlm.core.errors import DataError
from jaxlm.data import mixture, packing, readahead, sources

Batch = Dict[str, np.ndarray]  # packing.BATCH_KEYS -> [batch, length]


class _ProcessRows(grain.MapDataset):
  """This process's rows of each global batch: row r of local step s is parent[s*B + p*b + r]."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local

  def __len__(self) -> int:
    return len(self._parent) // self._global * self._local

  def __str__(self) -> str:
    return f'_ProcessRows(global={self._global}, local={self._local}, offset={self._offset})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._local)
    return self._parent[step * self._global + self._offset + row]

  def _getitems(self, indices):
    at = [divmod(i, self._local) for i in indices]
    return self._parent._getitems([s * self._global + self._offset + r for s, r in at])  # noqa: SLF001


def _allow_unparsed_absl_flags():
  # Grain 0.2.x reads an absl flag when starting workers and raises in programs that never
  # parsed flags (tests, notebooks); google/grain#1355, fixed upstream in #1362. Flags keep
  # their defaults, which is what an unparsed program gets anyway.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _epoch_seed(seed: int) -> int:
  # Grain reshuffles epoch e with seed + e, so hash the user seed: otherwise seed 1 would
  # replay seed 0's second epoch.
  if not 0 <= seed < 2**32:
    raise DataError(f'data.seed {seed} must be in [0, 2**32)')
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _local_batch(batch_size: int, process_count: int, key: str) -> int:
  if batch_size < 1 or batch_size % process_count:
    raise DataError(f'{key} {batch_size} must be a positive multiple of the process count '
                    f'{process_count}')
  return batch_size // process_count


class DataPipeline:
  """Train and eval batches for one process, built once from the config.

  Opens every source at construction (`sources.open_tokens`: a prepared store is
  opened, a small text corpus read whole), so data errors surface before any
  compile; windows are read from the stream only when a batch needs them.

  Args:
    cfg: the full config (uses `data`, `train.batch_size`, `train.grad_accum`, `eval`).
    tokenizer: from `tokenizers.get_tokenizer(cfg.data)`.
    process_index, process_count: this host and the host count (`jax.process_index()` etc.).
    store: a stream to use instead of opening `cfg.data` (tests, tools).
  """

  def __init__(self, cfg, tokenizer, process_index: int = 0, process_count: int = 1,
               store=None):
    if not 0 <= process_index < process_count:
      raise DataError(f'process_index {process_index} is not in [0, {process_count})')
    self.cfg = cfg
    self.tokenizer = tokenizer
    self.process_index = process_index
    self.process_count = process_count
    self.seq_len = int(cfg.data.seq_len)
    self.global_batch = int(cfg.train.batch_size)
    self.local_batch = _local_batch(self.global_batch, process_count, 'train.batch_size')
    if store is None and cfg.data.mixture:
      self.sources = mixture.load_sources(cfg, tokenizer)
    else:
      store = store if store is not None else sources.open_tokens(cfg.data, tokenizer)
      self.sources = [mixture.make_source(store.description, 1.0, store, cfg.data)]
    # For a mixture, the first source's (`self.sources` has them all).
    self.store, self.train_windows, self.val_windows = (
        self.sources[0].store, self.sources[0].train, self.sources[0].val)
    for s in self.sources:
      if len(s.train) < self.global_batch:
        raise DataError(
            f"data.path '{s.store.description}': train split has {s.train.n_tokens} tokens = "
            f'{len(s.train)} windows of data.seq_len {self.seq_len}, fewer than one '
            f'global batch of train.batch_size {self.global_batch}')
    self._eval = None
    logging.info('data: %d docs, %d tokens (%s); %d train / %d val windows of %d tokens '
                 '(validation: the last %d tokens; data.val_tokens %d, at most data.val_fraction '
                 '%g)', self.store.num_docs, len(self.store), tokenizer.name,
                 len(self.train_windows), len(self.val_windows), self.seq_len,
                 self.val_windows.n_tokens, cfg.data.val_tokens, cfg.data.val_fraction)

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per pass over the train windows (rounded down).

    For a mixture: until the source with the fewest windows for its weight runs out.
    """
    if len(self.sources) > 1:
      return mixture.epoch_windows(self.sources) // self.global_batch
    return len(self.train_windows) // self.global_batch

  def _batch(self, ds: grain.MapDataset, size: int) -> grain.MapDataset:
    """Rows -> batches; from object storage read concurrently and ahead (`readahead`)."""
    if any(getattr(s.store, 'remote', False) for s in self.sources):
      return readahead.ReadAheadBatches(ds, size, int(self.cfg.data.read_ahead))
    return ds.batch(size, drop_remainder=True)

  def train_dataset(self) -> grain.IterDataset:
    """The infinite per-process train batches, `[batch // processes, seq_len]` per key."""
    data = self.cfg.data
    seed = _epoch_seed(int(data.seed))
    if len(self.sources) > 1:
      ds = mixture.train_dataset(self.sources, seed, bool(data.shuffle))
    else:
      ds = grain.MapDataset.source(self.train_windows)
      if data.shuffle:
        ds = ds.shuffle(seed=seed)
      ds = ds.repeat()
    ds = _ProcessRows(ds, self.global_batch, self.process_index, self.process_count)
    ds = self._batch(ds, self.local_batch)
    # A small read-ahead: Grain's default buffer (hundreds of batches) costs memory, not speed,
    # since packing a window is a few numpy ops. data.prefetch=0 reads in the calling thread.
    ahead = int(data.prefetch)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2 if ahead else 0,
                                              prefetch_buffer_size=ahead))
    if data.worker_count > 0:
      _allow_unparsed_absl_flags()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data.worker_count)))
    return it

  def train_iterator(self) -> grain.DatasetIterator:
    """An infinite iterator of per-process train batches (`Batch`, `[local_batch, seq_len]`).

    `get_state()` / `set_state()` round-trip exactly (see module doc). With
    workers, call `.close()` when done to stop the worker processes promptly.
    """
    return iter(self.train_dataset())

  def eval_batches(self) -> List[Batch]:
    """`eval.batches` per-process validation batches, `[eval_batch // processes, seq_len]`.

    The same list on every call: validation windows in order, from the first,
    wrapping around when there are fewer than the batches need (for a mixture,
    each source's in order, interleaved in the weight ratio).
    """
    if self._eval is None:
      for s in self.sources:
        if not len(s.val):
          raise DataError(f"data.path '{s.store.description}': validation split is empty "
                          f'(data.val_tokens {self.cfg.data.val_tokens}, data.val_fraction '
                          f'{self.cfg.data.val_fraction}, {len(s.store)} tokens)')
      size = config_lib.eval_batch_size(self.cfg)
      key = ('eval.batch_size' if self.cfg.eval.batch_size else
             'train.batch_size / train.grad_accum')
      local = _local_batch(size, self.process_count, key)
      # The source indexes modulo its length, so repeat() is the wrap-around.
      ds = (mixture.val_dataset(self.sources) if len(self.sources) > 1 else
            grain.MapDataset.source(self.val_windows).repeat())
      ds = _ProcessRows(ds, size, self.process_index, self.process_count)
      ds = self._batch(ds, local)
      self._eval = [ds[k] for k in range(int(self.cfg.eval.batches))]
    return self._eval


def make_pipeline(cfg, process_index: int = 0, process_count: int = 1) -> DataPipeline:
  """Tokenizer from `cfg.data`, then the pipeline; the one call a trainer needs.

  `data.source='pairs'` (supervised {prompt, response} pairs) gives a
  `jaxlm.data.pairs.PairsPipeline`, which has the same interface.
  """
  from jaxlm.data.tokenizers import get_tokenizer
  if cfg.data.source == 'pairs':
    from jaxlm.data.pairs import PairsPipeline
    return PairsPipeline(cfg, get_tokenizer(cfg.data), process_index, process_count)
  return DataPipeline(cfg, get_tokenizer(cfg.data), process_index, process_count)
