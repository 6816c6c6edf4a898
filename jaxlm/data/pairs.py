"""Supervised data: {prompt, response} pairs as packed rows whose loss is on the response only.

``data.source='pairs'``: ``data.path`` is a JSONL file of ``{"prompt": str,
"response": str}`` records (``data.eval_path``: held-out pairs for
``eval/loss``). Each pair becomes one document ``prompt + response + EOS``;
documents are packed into rows with segment ids (so they never attend to each
other) and the loss mask is 1 only on targets that are response tokens or the
EOS. ``PairsPipeline`` has the DataPipeline interface the train loop uses, so
fine-tuning runs on the same loop (signals, resume, hooks, checkpoints).

The global batch at step s is rows ``order[s*B : (s+1)*B]`` of a stream that
concatenates one permutation of the rows per pass (pass e seeded by
``(data.seed, e)``): fixed by the data and the seed alone, so the iterator state
is just ``{'next_index': batches returned}``.
"""

import json
import logging

import numpy as np

from jaxlm.core import config as config_lib
from jaxlm.core import storage
from jaxlm.core.errors import DataError
from jaxlm.data.packing import BATCH_KEYS, batch_from_documents

log = logging.getLogger('jaxlm')


def load_pairs(path: str, key: str = 'data.path') -> list[tuple[str, str]]:
  """(prompt, response) pairs from a JSONL file; DataError names a bad line."""
  p = storage.path(path)
  if not path or not p.is_file():
    raise DataError(f"{key} '{path}' does not exist")
  pairs = []
  for n, line in enumerate(p.read_text(encoding='utf-8').splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      pair = (rec['prompt'], rec['response'])
      if not all(isinstance(x, str) for x in pair):
        raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError):
      raise DataError(f"{key} '{path}' line {n}: expected "
                      '{"prompt": str, "response": str}') from None
    pairs.append(pair)
  if not pairs:
    raise DataError(f"{key} '{path}' has no examples")
  return pairs


def encode_pair(tokenizer, prompt: str, response: str, add_bos: bool = False):
  """(ids [n], response_mask [n]): mask 1 on response tokens and the EOS."""
  p = [int(t) for t in tokenizer.encode(prompt)]
  r = [int(t) for t in tokenizer.encode(response)]
  if add_bos and tokenizer.bos_id is not None:
    p = [tokenizer.bos_id] + p
  if tokenizer.eos_id is not None:
    r = r + [tokenizer.eos_id]
  return np.asarray(p + r, np.int32), np.asarray([0] * len(p) + [1] * len(r), np.float32)


def pack_rows(examples, seq_len: int) -> dict[str, np.ndarray]:
  """Packs (ids, response_mask) documents into rows; each key [rows, seq_len].

  A document of n tokens gives n-1 (input, target) pairs; the loss mask of a
  pair is the response mask of its target. Documents longer than seq_len + 1
  keep their last seq_len + 1 tokens (the response end matters most).
  """
  rows, cur, used = [], [], 0
  for ids, mask in examples:
    ids, mask = ids[-(seq_len + 1):], mask[-(seq_len + 1):]
    if cur and used + len(ids) - 1 > seq_len:
      rows.append(cur)
      cur, used = [], 0
    cur.append((ids, mask[1:]))
    used += len(ids) - 1
  rows.append(cur)
  return batch_from_documents(rows, seq_len)


def rows_from_file(path: str, tokenizer, cfg, key: str) -> dict[str, np.ndarray]:
  pairs = load_pairs(path, key)
  rows = pack_rows([encode_pair(tokenizer, p, r, cfg.data.add_bos) for p, r in pairs],
                   cfg.data.seq_len)
  log.info('data: %s: %d pairs -> %d rows of %d tokens, %d response tokens', key, len(pairs),
           len(rows['inputs']), cfg.data.seq_len, int(rows['loss_mask'].sum()))
  return rows


class _RowIterator:
  """This process's share of each global batch of rows; ``get_state``/``set_state`` as Grain's."""

  def __init__(self, rows: dict, global_batch: int, seed: int, lo: int, hi: int):
    self._rows, self._batch, self._seed, self._lo, self._hi = rows, global_batch, seed, lo, hi
    self._n = len(rows['inputs'])
    self._next = 0

  def _order(self, start: int, count: int) -> np.ndarray:
    first, last = start // self._n, (start + count - 1) // self._n
    perms = np.concatenate([np.random.default_rng((self._seed, e)).permutation(self._n)
                            for e in range(first, last + 1)])
    off = start - first * self._n
    return perms[off:off + count]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    idx = self._order(self._next * self._batch, self._batch)[self._lo:self._hi]
    self._next += 1
    return {k: v[idx] for k, v in self._rows.items()}

  def get_state(self) -> dict:
    return {'next_index': self._next}

  def set_state(self, state: dict) -> None:
    self._next = int(state['next_index'])


class PairsPipeline:
  """Train rows from ``data.path`` and eval rows from ``data.eval_path`` for one process."""

  def __init__(self, cfg, tokenizer, process_index: int = 0, process_count: int = 1):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.global_batch = int(cfg.train.batch_size)
    if self.global_batch % process_count:
      raise DataError(f'train.batch_size {self.global_batch} must be a multiple of the process '
                      f'count {process_count}')
    self._share = lambda b: (b // process_count * process_index,
                             b // process_count * (process_index + 1))
    self.rows = rows_from_file(cfg.data.path, tokenizer, cfg, 'data.path')
    self.eval_rows = (rows_from_file(cfg.data.eval_path, tokenizer, cfg, 'data.eval_path')
                      if cfg.data.eval_path else None)
    self._eval = None

  def train_iterator(self) -> _RowIterator:
    return _RowIterator(self.rows, self.global_batch, int(self.cfg.data.seed),
                        *self._share(self.global_batch))

  def eval_batches(self) -> list[dict]:
    """Every held-out row once, in batches of the eval batch size (the last one padded with
    rows whose loss mask is 0); [] without ``data.eval_path``."""
    if self.eval_rows is None:
      return []
    if self._eval is None:
      size = config_lib.eval_batch_size(self.cfg)
      n = len(self.eval_rows['inputs'])
      pad = -n % size
      rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              for k, v in self.eval_rows.items() if k in BATCH_KEYS}
      lo, hi = self._share(size)
      self._eval = [{k: v[s:s + size][lo:hi] for k, v in rows.items()}
                    for s in range(0, n + pad, size)]
    return self._eval
