"""The `jaxlm prepare` token store on disk: token shards, read window by window.

Layout of a store directory (written by `ShardWriter`, read by `MappedStore`):

    shard-00000.tokens     token ids of its documents back to back, little-endian `dtype`
                           (uint16 when the vocabulary fits, else uint32), no header
    shard-00000.docs.npy   int64 `[docs + 1]`: where each document starts in the shard's
                           tokens, then the token count (a NumPy file, memory-mapped)
    manifest.json          `format` (`FORMAT`), dtype, specials stored, per-shard
                           document/token counts and largest token id; `complete` at the end

Why flat token files rather than ArrayRecord records: a window is one positioned
read (`os.pread`) of exactly its bytes, whatever the document sizes, so a store
of any size opens in milliseconds and reading costs the same at 1M or 100B
tokens. Finding a window's documents is a binary search in the shard's
`docs.npy`, memory-mapped with MADV_RANDOM so only the pages a search touches
become resident (at most 8 bytes per document). Tokens are read, not mapped: a
mapped token file would count every page the OS reads ahead (8 MB per fault on
some disks) in the process's RSS. The layout is Megatron's .bin/.idx idea
without its format; memory per host is the manifest, one small entry per
shard, the touched index pages and one window at a time.

A store on object storage (data.path='gs://...' or 's3://...') is read in place
through `jaxlm.core.storage`: opening reads the manifest and one listing of the
folder (sizes checked against it), a shard's document index is fetched whole
on first use (8 bytes per document) and kept in a least-recently-used cache of
at most `INDEX_CACHE_BYTES`, and a window is one ranged GET of exactly its
bytes. Requests answer in tens of milliseconds, so the pipeline reads a batch's
rows concurrently and batches ahead (`jaxlm.data.readahead`); per-host memory
is the index cache plus the batches in flight, whatever the store's size.

BOS/EOS the store does not hold are inserted while reading (per data.add_bos /
data.add_eos), so one store serves configs with and without them; the stream a
pipeline sees is every document, each wrapped in its specials, in shard order.
"""

import bisect
import collections
import io
import json
import mmap
import os
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from jaxlm.core import storage
from jaxlm.core.errors import DataError

FORMAT = 'jaxlm-token-shards-1'
INDEX_CACHE_BYTES = 256 << 20  # remote stores: document indexes held per process, at most
_OPEN_FILES = 64  # token files each thread keeps open (least recently used closed first)
MANIFEST = 'manifest.json'
TOKENS_SUFFIX = '.tokens'
DOCS_SUFFIX = '.docs.npy'
# (tokens int32 [n], offsets in (0, n) where a new document begins, increasing)
Read = Tuple[np.ndarray, np.ndarray]


def docs_file(tokens_file: str) -> str:
  """'shard-00000.tokens' -> 'shard-00000.docs.npy'."""
  return tokens_file[:-len(TOKENS_SUFFIX)] + DOCS_SUFFIX


def read_manifest(folder) -> Optional[dict]:
  """The store manifest in `folder` (a directory or gs:// / s3:// URI) if it is one of this
  format, else None."""
  path = storage.join(folder, MANIFEST) if storage.is_remote(folder) else Path(folder) / MANIFEST
  if storage.is_remote(folder):
    raw = storage.read_bytes_or_none(path)
    if raw is None:
      return None
  elif not path.is_file():
    return None
  else:
    raw = None
  try:
    manifest = json.loads(path.read_text() if raw is None else raw.decode('utf-8'))
  except (OSError, ValueError) as e:
    raise DataError(f"'{path}' is not readable JSON: {e}") from None
  return manifest if isinstance(manifest, dict) and manifest.get('format') == FORMAT else None


class ShardWriter:
  """Appends documents, piece by piece, to one shard; memory is one piece plus the doc index.

  `add(tokens)` appends to the current document; `end_doc()` closes it. Locally,
  files are written under `.partial` names and renamed by `close()`, tokens last,
  so a `.tokens` file exists only for a finished shard. On object storage (no
  rename) the tokens stream into an upload that `close()` completes after the
  document index is uploaded: a killed writer leaves no `.tokens` object.
  """

  def __init__(self, folder, name: str, dtype: str, bos: Optional[int] = None,
               eos: Optional[int] = None):
    self.remote = storage.is_remote(folder)
    self.folder = folder if self.remote else Path(folder)
    self.name = name
    self._dt = np.dtype(dtype).newbyteorder('<')
    self._bos = None if bos is None else np.asarray([bos], self._dt)
    self._eos = None if eos is None else np.asarray([eos], self._dt)
    if self.remote:
      self._tmp = None
      self._file = storage.open_write(storage.join(folder, name))
    else:
      self._tmp = self.folder / (name + '.partial')
      self._file = open(self._tmp, 'wb')  # noqa: SIM115
    self._starts: List[int] = []  # per kept document
    self._n = 0  # tokens written
    self._doc_len = 0  # tokens of the open document so far
    self.max_token = -1

  def _write(self, ids: np.ndarray) -> None:
    self.max_token = max(self.max_token, int(ids.max()))
    self._file.write(ids.astype(self._dt, copy=False).tobytes())
    self._n += len(ids)
    self._doc_len += len(ids)

  def add(self, ids: np.ndarray) -> None:
    """Appends token ids `[piece]` to the open document (BOS first, if stored)."""
    if not len(ids):
      return
    if self._doc_len == 0:
      self._starts.append(self._n)
      if self._bos is not None:
        self._write(self._bos)
    self._write(np.asarray(ids))

  def end_doc(self) -> bool:
    """Closes the open document (EOS last, if stored); False if it had no tokens (not kept)."""
    kept = self._doc_len > 0
    if kept and self._eos is not None:
      self._write(self._eos)
    self._doc_len = 0
    return kept

  def close(self) -> Dict:
    """Finishes the shard; returns its manifest entry (`file`, `docs`, `tokens`, `max_token`)."""
    entry = {'file': self.name, 'docs': len(self._starts), 'tokens': self._n,
             'max_token': self.max_token}
    if self.remote:
      index = io.BytesIO()
      np.save(index, np.asarray(self._starts + [self._n], np.int64))
      storage.path(storage.join(self.folder, docs_file(self.name))).write_bytes(index.getvalue())
      self._file.close()  # completes the tokens upload: the shard now exists
      return entry
    self._file.close()
    docs_tmp = self.folder / (docs_file(self.name) + '.partial')
    with open(docs_tmp, 'wb') as f:
      np.save(f, np.asarray(self._starts + [self._n], np.int64))
    os.replace(docs_tmp, self.folder / docs_file(self.name))
    os.replace(self._tmp, self.folder / self.name)
    return entry

  def abort(self) -> None:
    if self.remote:
      storage.discard(self._file)
    else:
      self._file.close()


class MappedStore:
  """A prepared store as one random-access token stream (same protocol as `TokenStore.read`).

  Memory: a few numbers per shard. Document indexes are mapped and token files
  opened on first use, per process (so the object pickles small, for Grain's
  worker processes) and, for token files, per thread.

  Args:
    folder: the store directory.
    manifest: its parsed manifest.json (`read_manifest`).
    bos, eos: ids to insert around each document (None = the store's own, if any).
    max_docs: keep only the first documents (0 = all).
    requests: remote stores: ranged GETs in flight at once (data.read_requests).
  """

  def __init__(self, folder, manifest: dict, bos: Optional[int] = None,
               eos: Optional[int] = None, max_docs: int = 0, requests: int = 64):
    self.remote = storage.is_remote(folder)
    self.requests = requests  # remote: ranged GETs in flight at once (`read_many`)
    self.folder = folder if self.remote else Path(folder)
    self.description = str(folder)
    # Remote: one listing gives every shard's size (no request per shard).
    self._sizes = storage.list_sizes(folder) if self.remote else None
    self._index: Dict[int, np.ndarray] = collections.OrderedDict()  # shard -> docs index
    self._index_bytes = 0
    self._lock = threading.Lock()
    self.skipped = 0
    self.dtype = np.dtype(manifest['dtype']).newbyteorder('<')
    self._bos, self._eos = bos, eos
    self._k = (bos is not None) + (eos is not None)  # specials added per document
    files, docs, tokens = [], [], []
    left = max_docs or None  # documents still wanted
    for s in manifest['shards']:
      n_docs, n_tokens = int(s['docs']), int(s['tokens'])
      if left is not None and n_docs >= left:
        n_docs, left = left, 0
        n_tokens = int(self._load_index(s['file'])[n_docs])
      elif left is not None:
        left -= n_docs
      if n_docs:
        self._check(s['file'], int(s['tokens']))
        files.append(s['file'])
        docs.append(n_docs)
        tokens.append(n_tokens)
      if left == 0:
        break
    self._files = files
    self._docs = docs
    lengths = [t + self._k * d for t, d in zip(tokens, docs)]  # with inserted specials
    # Python ints: bisect on a short list beats NumPy calls per window.
    self._bounds = [0] + np.cumsum(lengths, dtype=np.int64).tolist()  # stream start per shard
    self.num_docs = sum(docs)
    self._local = threading.local()  # per thread: open token files

  def _check(self, name: str, n_tokens: int) -> None:
    if self.remote:
      size = self._sizes.get(name)
      found = size is not None and docs_file(name) in self._sizes
    else:
      path = self.folder / name
      found = path.is_file() and (self.folder / docs_file(name)).is_file()
      size = path.stat().st_size if found else None
    if not found:
      raise DataError(f"data.path '{self.folder}': shard '{name}' listed in {MANIFEST} is "
                      'missing; prepare the store again')
    if size != n_tokens * self.dtype.itemsize:
      raise DataError(f"data.path '{self.folder}': shard '{name}' is {size} "
                      f'bytes, not the {n_tokens} {self.dtype.name} tokens {MANIFEST} lists')

  def _file(self, name: str):
    return storage.join(self.folder, name) if self.remote else self.folder / name

  def _load_index(self, name: str) -> np.ndarray:
    """A shard's document starts: memory-mapped locally, fetched whole (one GET) remotely."""
    if self.remote:
      return np.load(io.BytesIO(storage.read_range(
          self._file(docs_file(name)), 0, self._sizes[docs_file(name)])))
    mapped = np.load(self.folder / docs_file(name), mmap_mode='r')
    if hasattr(mapped, '_mmap') and hasattr(mmap, 'MADV_RANDOM'):
      mapped._mmap.madvise(mmap.MADV_RANDOM)  # a binary search needs no read-ahead
    return np.asarray(mapped)  # a plain view indexes faster

  def __len__(self) -> int:
    return self._bounds[-1]

  def __getstate__(self):
    # Maps and open files are per process (Grain workers unpickle a copy), reopened on use.
    return {k: v for k, v in self.__dict__.items() if k not in ('_index', '_local', '_lock')}

  def __setstate__(self, state):
    self.__dict__.update(state, _index=collections.OrderedDict(), _index_bytes=0,
                         _local=threading.local(), _lock=threading.Lock())

  def _starts(self, i: int) -> np.ndarray:
    """Shard i's document starts, int64 `[docs + 1]` (memory-mapped, or cached if remote)."""
    starts = self._index.get(i)
    if starts is not None:
      if self.remote:
        with self._lock:
          if i in self._index:
            self._index.move_to_end(i)
      return starts
    starts = self._load_index(self._files[i])
    if not self.remote:  # the OS pages a mapped index in and out: no limit needed
      self._index[i] = starts
      return starts
    with self._lock:  # remote: a bounded LRU (another thread may have loaded it meanwhile)
      if i not in self._index:
        self._index[i] = starts
        self._index_bytes += starts.nbytes
        while self._index_bytes > INDEX_CACHE_BYTES and len(self._index) > 1:
          self._index_bytes -= self._index.popitem(last=False)[1].nbytes
    return starts

  def _tokens(self, i: int, a: int, b: int) -> np.ndarray:
    """Raw tokens `[a, b)` of shard i, one positioned read (remote: one ranged GET)."""
    size = self.dtype.itemsize
    if self.remote:
      if a == b:
        return np.zeros(0, self.dtype)
      raw = storage.read_range(self._file(self._files[i]), a * size, b * size)
      return np.frombuffer(raw, self.dtype)
    files = getattr(self._local, 'files', None)
    if files is None:
      files = self._local.files = collections.OrderedDict()
    f = files.get(i)
    if f is None:
      if len(files) >= _OPEN_FILES:
        files.popitem(last=False)
      f = files[i] = _File(self.folder / self._files[i])
    else:
      files.move_to_end(i)
    return np.frombuffer(os.pread(f.fd, (b - a) * size, a * size), self.dtype)

  def read_many(self, spans) -> List[Read]:
    """`read(lo, hi)` of each `(lo, hi)` in `spans`; remotely all ranged GETs at once.

    Two passes over the (cheap) index arithmetic: the first collects the byte
    ranges every span needs, which are fetched concurrently (`storage.read_ranges`:
    one asyncio batch, not a thread per request); the second assembles the reads.
    """
    if not self.remote:
      return [self.read(lo, hi) for lo, hi in spans]
    wanted = []

    def plan(i, a, b):
      wanted.append((i, a, b))
      return np.zeros(b - a, self.dtype)

    for lo, hi in spans:
      self.read(lo, hi, plan)
    size = self.dtype.itemsize
    todo = sorted({w for w in wanted if w[1] < w[2]})
    raw = storage.read_ranges([self._file(self._files[i]) for i, _, _ in todo],
                              [a * size for _, a, _ in todo], [b * size for _, _, b in todo],
                              self.requests)
    got = {w: np.frombuffer(r, self.dtype) for w, r in zip(todo, raw)}
    empty = np.zeros(0, self.dtype)
    return [self.read(lo, hi, lambda i, a, b: got[(i, a, b)] if a < b else empty)
            for lo, hi in spans]

  def read(self, lo: int, hi: int, fetch=None) -> Read:
    """Stream tokens `[lo, hi)` and where documents start among them (`Read`).

    `fetch(shard, a, b)` returns the shard's raw tokens `[a, b)` (default: read them).
    """
    fetch = fetch or self._tokens
    if not 0 <= lo <= hi <= len(self):
      raise IndexError(f'[{lo}, {hi}) is outside the stream [0, {len(self)})')
    if lo == hi:
      return np.zeros(0, np.int32), np.zeros(0, np.int64)
    s = bisect.bisect_right(self._bounds, lo) - 1
    if hi <= self._bounds[s + 1]:  # the usual case: one shard
      return self._read_shard(s, lo - self._bounds[s], hi - self._bounds[s], fetch)
    tokens, starts, at = [], [], 0
    while lo < hi:  # documents never span shards: each shard after the first starts one
      end = min(hi, self._bounds[s + 1])
      t, d = self._read_shard(s, lo - self._bounds[s], end - self._bounds[s], fetch)
      tokens.append(t)
      starts.append(d + at if not at else np.concatenate(([at], d + at)))
      at, lo, s = at + len(t), end, s + 1
    return np.concatenate(tokens), np.concatenate(starts)

  def _read_shard(self, i: int, lo: int, hi: int, fetch) -> Read:
    """Shard i's stream `[lo, hi)` (specials inserted) and where documents start in it.

    Few NumPy calls on purpose: this runs once per window, and at ~1 us per call the
    call count, not the bytes, sets the loader's speed.
    """
    starts = self._starts(i)
    n_docs, k, n = self._docs[i], self._k, hi - lo
    # Documents j0..j1 hold [lo, hi); a document's stream start is its token start plus k
    # per earlier document, which increases strictly (no empty documents).
    j0 = _last_at_or_before(starts, n_docs, k, lo)
    m = min(n_docs - j0, (n - 1) // (1 + k) + 2)  # a document spans >= 1 + k stream tokens
    edges = starts[j0:j0 + m + 1] - lo  # stream starts of documents j0.., relative to lo
    if k:
      edges += np.arange(j0, j0 + m + 1) * k
    t = int(np.searchsorted(edges, n - 1, 'right'))  # documents touched: j0..j1 = j0 + t - 1
    j1, edges = j0 + t - 1, edges[:t + 1]
    first, after = int(edges[0]), int(edges[-1])  # <= 0 and >= n
    inner = edges[1:-1]  # documents j0 + 1..j1 start inside [lo, hi)
    if not k:  # raw tokens are the stream
      return fetch(i, lo, hi).astype(np.int32), inner
    # Raw tokens behind [lo, hi): stream position v of document j is raw v - j * k - nb.
    nb = int(self._bos is not None)
    a = max(lo - j0 * k - nb, int(starts[j0]))
    b = min(hi - 1 - j1 * k - nb, int(starts[j1 + 1]) - 1) + 1
    out = np.empty(n, np.int32)
    special = np.zeros(n, bool)
    if nb:  # at each document's start, the first one's only if [lo, hi) has it
      at = edges[:-1] if first == 0 else inner
      out[at] = self._bos
      special[at] = True
    if self._eos is not None:  # before each document's end, the last one's only if in [lo, hi)
      at = (edges[1:] if after == n else inner) - 1
      out[at] = self._eos
      special[at] = True
    out[~special] = fetch(i, a, max(a, b))
    return out, inner


def _last_at_or_before(starts: np.ndarray, n_docs: int, k: int, lo: int) -> int:
  """The last document j whose stream start `starts[j] + j * k` is <= lo."""
  upper = min(int(np.searchsorted(starts, lo, 'right')) - 1, n_docs - 1)  # as if k were 0
  if not k:
    return upper
  lower = max(int(np.searchsorted(starts, lo - upper * k, 'right')) - 1, 0)
  if upper - lower > 1024:  # a wide bracket (many tiny documents): search it in Python
    return bisect.bisect_right(range(lower, upper + 1), lo,
                               key=lambda j: int(starts[j]) + j * k) + lower - 1
  between = starts[lower:upper + 1] + np.arange(lower, upper + 1) * k
  return lower + int(np.searchsorted(between, lo, 'right')) - 1


class _File:
  """An open file descriptor, closed when dropped (from the LRU, or with its thread)."""

  _close = staticmethod(os.close)  # still reachable in __del__ at interpreter exit

  def __init__(self, path: Path):
    self.fd = os.open(path, os.O_RDONLY)
    if hasattr(os, 'posix_fadvise'):  # windows are read in random order: no read-ahead
      os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

  def __del__(self):
    self._close(self.fd)
