"""Train/validation split of a token stream, and packed fixed-length windows over a split.

A stream is anything with `len()` and `read(lo, hi) -> (tokens, starts)`
(`sources.TokenStore` in memory, `store.MappedStore` on disk); a window reads
only its own tokens, so the windows of a split cost no memory until read.

A window is `seq_len + 1` consecutive stream tokens, so neighbouring windows
share one token (window i's last target is window i+1's first input) and no
next-token pair is lost. Documents are packed back to back; `segment_ids`,
`positions` and `loss_mask` keep attention and loss inside each document.

The final partial window of a split is padded (token 0, segment 0, loss mask 0)
rather than dropped, so every next-token pair of a split is trained or evaluated
exactly once per epoch and a tiny validation split still yields a window.
"""

from typing import Dict, List, Optional

import numpy as np

from jaxlm.core.errors import DataError

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


def train_tokens(n_tokens: int, val_tokens: int, val_fraction: float) -> int:
  """Where the stream splits: all but the last `min(val_tokens, cap)` tokens train.

  The cap, `n - int(n * (1 - val_fraction))`, keeps a small corpus mostly for
  training (and with val_fraction 0.1 it is nanoGPT's 90/10 shakespeare split);
  on a large one the held-out size is the fixed data.val_tokens. The cut is by
  token, not by document, so one document may straddle both splits; each half
  is then its own segment.
  """
  if val_tokens < 0:
    raise DataError(f'data.val_tokens {val_tokens} must be >= 0')
  if not 0.0 <= val_fraction < 1.0:
    raise DataError(f'data.val_fraction {val_fraction} must be in [0, 1)')
  cap = n_tokens - int(n_tokens * (1.0 - val_fraction))
  return n_tokens - min(int(val_tokens), cap)


def num_windows(n_tokens: int, seq_len: int) -> int:
  """Windows over `n_tokens` stream tokens, the final partial one included (it is padded)."""
  return 0 if n_tokens < 2 else -(-(n_tokens - 1) // seq_len)


def pack_window(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Dict[str, np.ndarray]:
  """Turns up to `seq_len + 1` stream tokens into one training example.

  Args:
    tokens: int `[k]`, k <= seq_len + 1; fewer means the rest is padding.
    starts: int `[s]`, increasing offsets in `(0, k)` where a new document begins
      (the window's first token always starts a segment, so 0 is never listed).
    seq_len: length of the example.

  Returns:
    A dict of `[seq_len]` arrays: `inputs`, `targets` (inputs shifted by one),
    `segment_ids` (1, 2, ... per document within the window; 0 on padding),
    `positions` (0-based within each segment), all int32; and `loss_mask`
    (float32 1.0 where input and target are in the same document, else 0.0).
    `inputs` and `targets` are views of one buffer (batching copies them).
  """
  # Few NumPy calls on purpose: this runs once per window, and per-call overhead sets its cost.
  k = len(tokens)
  n = min(k, seq_len)  # real inputs; the rest is padding
  t = np.zeros(seq_len + 1, np.int32)
  t[:k] = tokens
  # A document starting at token n (a target only) makes an empty last segment: count 0.
  bounds = np.concatenate(([0], starts, [n]))
  counts = np.diff(bounds)
  segment_ids = np.zeros(seq_len, np.int32)
  segment_ids[:n] = np.repeat(np.arange(1, len(counts) + 1, dtype=np.int32), counts)
  positions = np.zeros(seq_len, np.int32)
  positions[:n] = np.arange(n, dtype=np.int32) - np.repeat(bounds[:-1].astype(np.int32), counts)
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[:k - 1] = 1.0  # input i has target i + 1 in the window...
  loss_mask[starts - 1] = 0.0  # ...of the same document
  return {'inputs': t[:-1], 'targets': t[1:], 'segment_ids': segment_ids,
          'positions': positions, 'loss_mask': loss_mask}


def doc_starts(doc_ids: np.ndarray) -> np.ndarray:
  """Per-token document ids `[k]` -> offsets in `(0, k)` where the id changes (`pack_window`)."""
  return np.flatnonzero(doc_ids[1:] != doc_ids[:-1]) + 1


def batch_from_documents(rows, width: int) -> Dict[str, np.ndarray]:
  """Rows of whole documents -> one batch of `BATCH_KEYS` arrays, each `[len(rows), width]`.

  For scoring and fine-tuning, where examples are documents rather than a
  token stream. A row is a list of `(ids, target_mask)` documents placed back
  to back: `ids` int `[n + 1]` gives n (input, target) pairs and `target_mask`
  float `[n]` marks the targets that count. Each document is its own segment
  (1, 2, ...) with positions from 0; the rest of the row is padding (segment
  0, mask 0). Documents must fit: their pairs add up to at most `width`.
  """
  out = {k: np.zeros((len(rows), width), np.float32 if k == 'loss_mask' else np.int32)
         for k in BATCH_KEYS}
  for r, docs in enumerate(rows):
    at = 0
    for seg, (ids, mask) in enumerate(docs, 1):
      n = len(ids) - 1
      sl = slice(at, at + n)
      out['inputs'][r, sl], out['targets'][r, sl] = ids[:-1], ids[1:]
      out['loss_mask'][r, sl], out['segment_ids'][r, sl] = mask, seg
      out['positions'][r, sl] = np.arange(n)
      at += n
  return out


class Windows:
  """Random-access windows over stream tokens `[lo, hi)`; a Grain data source, picklable.

  Window i is stream tokens `[lo + i * seq_len, lo + i * seq_len + seq_len + 1)`
  (cut at `hi`), packed by `pack_window`.
  """

  def __init__(self, stream, seq_len: int, lo: int = 0, hi: Optional[int] = None):
    if seq_len < 1:
      raise DataError(f'data.seq_len {seq_len} must be >= 1')
    self.stream = stream
    self.seq_len = seq_len
    self.lo, self.hi = lo, len(stream) if hi is None else hi
    self.n_tokens = self.hi - self.lo
    self._len = num_windows(self.n_tokens, seq_len)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> Dict[str, np.ndarray]:
    if not 0 <= i < self._len:
      raise IndexError(f'window {i} out of range [0, {self._len})')
    lo = self.lo + i * self.seq_len
    tokens, starts = self.stream.read(lo, min(lo + self.seq_len + 1, self.hi))
    return pack_window(tokens, starts, self.seq_len)

  def _getitems(self, indices) -> List[Dict[str, np.ndarray]]:
    """Windows `indices` at once (Grain's batched read; a remote store fetches them together)."""
    spans = []
    for i in indices:
      if not 0 <= i < self._len:
        raise IndexError(f'window {i} out of range [0, {self._len})')
      lo = self.lo + i * self.seq_len
      spans.append((lo, min(lo + self.seq_len + 1, self.hi)))
    many = getattr(self.stream, 'read_many', None)
    reads = many(spans) if many is not None else [self.stream.read(*s) for s in spans]
    return [pack_window(t, d, self.seq_len) for t, d in reads]

  def __repr__(self) -> str:
    return f'Windows(n={self._len}, seq_len={self.seq_len}, tokens=[{self.lo}, {self.hi}))'
