"""The token stream of data.source: a prepared store read from disk, or a small corpus in memory.

`open_tokens` returns either
  * a `store.MappedStore` for a `jaxlm prepare` store (data.source='arrayrecord',
    data.path its directory): opened in milliseconds, read window by window; or
  * a `TokenStore` for text, JSONL, this Python's stdlib, or ArrayRecord files of
    one document per record: read and tokenized whole, up front, so only for
    corpora up to `IN_MEMORY_LIMIT_MB` of input files (above that, a one-line
    error says to run `jaxlm prepare`).
Both give `len()` (stream tokens), `read(lo, hi)`, `num_docs`, `skipped` and
`description`.

Documents are concatenated in a fixed order (sorted file names, then line or
record order), each wrapped in BOS/EOS per `data.add_bos` / `data.add_eos`.
Documents with no tokens are dropped, so no document is only specials.
"""

import dataclasses
import glob
import json
import logging
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

import numpy as np

from jaxlm.core import storage
from jaxlm.core.errors import DataError
from jaxlm.data import store as store_lib
from jaxlm.data import workdir_tokenizer

# Input bytes read whole into memory at most: a TokenStore costs ~10 bytes of RAM per token
# while loading (int32 tokens and doc ids plus the text), so ~1 GB at the byte tokenizer.
IN_MEMORY_LIMIT_MB = 100
_SOURCES = ('text', 'jsonl', 'arrayrecord', 'pystdlib')
# Stdlib folders that are test suites or third-party code, not the library itself.
_STDLIB_SKIP = {'test', 'tests', 'idle_test', 'site-packages', 'dist-packages', '__pycache__'}


@dataclasses.dataclass
class TokenStore:
  """All documents as one stream.

  Attributes:
    tokens: int32 `[stream]`, documents back to back with their BOS/EOS.
    doc_ids: int32 `[stream]`, index of the document each token belongs to (0-based, increasing).
    num_docs: documents kept.
    skipped: JSONL lines that were not JSON objects or lacked the text field.
    description: where the tokens came from, for logs and errors.
  """
  tokens: np.ndarray
  doc_ids: np.ndarray
  num_docs: int
  skipped: int
  description: str

  def __len__(self) -> int:
    return len(self.tokens)

  def read(self, lo: int, hi: int) -> store_lib.Read:
    """Stream tokens `[lo, hi)` and where documents start among them (`store.Read`)."""
    ids = self.doc_ids[lo:hi]
    return self.tokens[lo:hi], np.flatnonzero(ids[1:] != ids[:-1]) + 1


def open_tokens(data_cfg, tokenizer):
  """The stream of `data_cfg` (module doc): a MappedStore if data.path is a prepared store."""
  if storage.is_remote(data_cfg.path):
    return _open_remote(data_cfg, tokenizer)
  if data_cfg.source == 'arrayrecord' and data_cfg.path and not glob.has_magic(data_cfg.path):
    folder = Path(data_cfg.path).expanduser()
    manifest = store_lib.read_manifest(folder) if folder.is_dir() else None
    if manifest is not None:
      return _open_store(folder, manifest, data_cfg, tokenizer)
  return load_tokens(data_cfg, tokenizer)


def _open_remote(data_cfg, tokenizer) -> store_lib.MappedStore:
  """A `jaxlm prepare` store on object storage, read in place (the one remote data.path kind)."""
  where = data_cfg.path.rstrip('/')
  storage.check(where)
  if data_cfg.source != 'arrayrecord':
    raise DataError(f"data.path '{where}' is on object storage, which data.source "
                    f"'{data_cfg.source}' cannot read; run `jaxlm prepare --input=... "
                    f"--output={where}` and set data.source=arrayrecord")
  manifest = store_lib.read_manifest(where)
  if manifest is None:
    raise DataError(f"data.path '{where}' holds no {store_lib.MANIFEST} of a `jaxlm prepare` "
                    'store (remote data is read only as such a store)')
  return _open_store(where, manifest, data_cfg, tokenizer)


def _open_store(folder, manifest: dict, data_cfg, tokenizer) -> store_lib.MappedStore:
  if not manifest.get('complete'):
    raise DataError(f"data.path '{folder}' is a partly written store; finish it by running "
                    'the same `jaxlm prepare` command again')
  _check_store_tokenizer(folder, manifest.get('tokenizer') or {}, data_cfg)
  # Specials the store does not hold already are inserted while reading.
  bos = _special(tokenizer, 'bos')[0] if data_cfg.add_bos and not manifest['add_bos'] else None
  eos = _special(tokenizer, 'eos')[0] if data_cfg.add_eos and not manifest['add_eos'] else None
  largest = max((int(s['max_token']) for s in manifest['shards']), default=-1)
  if largest >= tokenizer.vocab_size:
    raise DataError(f"data.path '{folder}' has token id {largest} >= vocab size "
                    f"{tokenizer.vocab_size} of tokenizer '{tokenizer.name}'")
  store = store_lib.MappedStore(folder, manifest, bos, eos, int(data_cfg.max_docs),
                                int(data_cfg.read_requests))
  if not len(store):
    raise DataError(f"data.path '{folder}' yielded zero tokens")
  return store


def _check_store_tokenizer(folder: Path, made_with: dict, data_cfg) -> None:
  """DataError unless the run's tokenizer is the one the store was prepared with (kind, and
  for file tokenizers the file's sha256): another tokenizer of the same size would train
  on ids that mean other text."""
  kind = made_with.get('kind')
  if kind and kind != data_cfg.tokenizer:
    raise DataError(f"data.path '{folder}' was prepared with tokenizer '{kind}', not "
                    f"data.tokenizer='{data_cfg.tokenizer}'")
  want = made_with.get('sha256')
  src = workdir_tokenizer.source_file(data_cfg)
  # A 'char' run keeps only its alphabet, whose hash is not the text's the store recorded.
  if want and kind != 'char' and src is not None and src.is_file() and \
      workdir_tokenizer.sha256_of(src) != want:
    raise DataError(f"data.path '{folder}' was prepared with a different tokenizer file "
                    f"(sha256 {want[:12]}..., from {made_with.get('path')}) than "
                    f"data.tokenizer_path '{data_cfg.tokenizer_path}'; prepare the store again "
                    'with this tokenizer or train with the original one')


def _check_size(files: Sequence[Path], where: str, source: str) -> None:
  size = sum(f.stat().st_size for f in files)
  if size <= IN_MEMORY_LIMIT_MB * 2**20:
    return
  what = (f"--input='{where}'" if source != 'arrayrecord' else '--input=<the original text>')
  raise DataError(f"data.path '{where}' is {size / 2**20:,.0f} MB of {source} files, more than "
                  f'the {IN_MEMORY_LIMIT_MB} MB read into memory; run `jaxlm prepare {what} '
                  '--output=STORE` and train with data.source=arrayrecord data.path=STORE')


def load_tokens(data_cfg, tokenizer) -> TokenStore:
  """Reads `data_cfg.source` whole and tokenizes it into a TokenStore (see module doc)."""
  source = data_cfg.source
  if source not in _SOURCES:
    raise DataError(f"data.source '{source}' is not one of {', '.join(map(repr, _SOURCES))}")
  limit = int(data_cfg.max_docs) if data_cfg.max_docs > 0 else None
  skipped = [0]
  if source == 'pystdlib':
    where = sysconfig.get_paths()['stdlib']
    docs = (tokenizer.encode(_read_text(f)) for f in _stdlib_files(Path(where)))
  elif source == 'text':
    where = data_cfg.path
    files = _match_files(where, ('*.txt',))
    _check_size(files, where, source)
    docs = (tokenizer.encode(_read_text(f)) for f in files)
  elif source == 'jsonl':
    where = data_cfg.path
    files = _match_files(where, ('*.jsonl',))
    _check_size(files, where, source)
    texts = _jsonl_texts(files, data_cfg.jsonl_field, skipped)
    docs = (tokenizer.encode(t) for t in texts)
  else:
    where = data_cfg.path
    files = _match_files(where, ('*.array_record*', '*.arrayrecord'))
    _check_size(files, where, source)
    docs = _arrayrecord_docs(files)
    stored = _manifest(files)  # a `jaxlm prepare` store may hold its specials already
    if not stored.get('complete', True):
      raise DataError(f"data.path '{where}' is a partly written store; finish it by running "
                      'the same `jaxlm prepare` command again')
    if stored.get('add_bos') or stored.get('add_eos'):
      data_cfg = _Specials(data_cfg.add_bos and not stored.get('add_bos'),
                           data_cfg.add_eos and not stored.get('add_eos'))
  store = _concatenate(_take(docs, limit), tokenizer, data_cfg, skipped, where)
  if skipped[0]:
    logging.warning('%s: skipped %d JSONL lines without a %r string', where, skipped[0],
                    data_cfg.jsonl_field)
  if source == 'arrayrecord' and store.tokens.max() >= tokenizer.vocab_size:
    raise DataError(f"data.path '{where}' has token id {store.tokens.max()} >= vocab size "
                    f"{tokenizer.vocab_size} of tokenizer '{tokenizer.name}'")
  return store


def _take(docs: Iterable[np.ndarray], limit) -> Iterator[np.ndarray]:
  """Yields the first `limit` non-empty documents (all if None); empty ones don't count."""
  n = 0
  for doc in docs:
    if limit is not None and n >= limit:
      return
    if len(doc):
      n += 1
      yield doc


def _concatenate(docs, tokenizer, data_cfg, skipped, where) -> TokenStore:
  pieces: List[np.ndarray] = []
  lengths: List[int] = []
  bos = _special(tokenizer, 'bos') if data_cfg.add_bos else None
  eos = _special(tokenizer, 'eos') if data_cfg.add_eos else None
  for doc in docs:
    parts = [p for p in (bos, doc.astype(np.int32, copy=False), eos) if p is not None]
    pieces.extend(parts)
    lengths.append(sum(len(p) for p in parts))
  if not lengths:
    raise DataError(f"data.path '{where}' yielded zero tokens")
  tokens = np.concatenate(pieces)
  doc_ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
  return TokenStore(tokens, doc_ids, len(lengths), skipped[0], str(where))


def _special(tokenizer, which: str) -> np.ndarray:
  token = getattr(tokenizer, f'{which}_id')
  if token is None:
    raise DataError(f"data.add_{which} is set but tokenizer '{tokenizer.name}' has no "
                    f"{which.upper()} token")
  return np.asarray([token], dtype=np.int32)


def _read_text(path: Path) -> str:
  # A stray non-UTF-8 byte should cost one U+FFFD, not the whole run.
  return path.read_bytes().decode('utf-8', errors='replace')


def _match_files(path: str, patterns: Sequence[str]) -> List[Path]:
  """`path` (file, directory searched recursively for `patterns`, or glob) -> sorted files."""
  if not path:
    raise DataError('data.path is empty; set it to a file, directory or glob')
  p = Path(path).expanduser()
  if glob.has_magic(path):
    files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
  elif p.is_dir():
    files = sorted({f for pat in patterns for f in p.rglob(pat) if f.is_file()})
  elif p.is_file():
    files = [p]
  else:
    raise DataError(f"data.path '{path}' does not exist")
  if not files:
    raise DataError(f"data.path '{path}' matched no files ({', '.join(patterns)})")
  return files


def _stdlib_files(root: Path) -> Iterator[Path]:
  """Every stdlib `.py` file in sorted order; os.walk prunes site-packages (rglob would not)."""
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
    for name in sorted(filenames):
      if name.endswith('.py'):
        yield Path(dirpath) / name


def _jsonl_texts(files: Sequence[Path], field: str, skipped: List[int]) -> Iterator[str]:
  """The `field` string of every JSON-object line; counts the other non-blank lines in skipped."""
  for f in files:
    with open(f, encoding='utf-8', errors='replace') as lines:
      for line in lines:
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError:
          obj = None
        text = obj.get(field) if isinstance(obj, dict) else None
        if isinstance(text, str):
          yield text
        else:
          skipped[0] += 1


@dataclasses.dataclass
class _Specials:
  """The specials still to add around each document (the rest are in the records)."""
  add_bos: bool
  add_eos: bool


def _manifest(files: Sequence[Path]) -> dict:
  """The `manifest.json` beside the first file ({} if none)."""
  manifest = files[0].parent / 'manifest.json'
  if not manifest.is_file():
    return {}
  try:
    return dict(json.loads(manifest.read_text()))
  except (ValueError, TypeError) as e:
    raise DataError(f"'{manifest}' is not a JSON object: {e}") from None


def _record_dtype(files: Sequence[Path]) -> np.dtype:
  """Token dtype from a `manifest.json` beside the first file, else little-endian uint32."""
  try:
    return np.dtype(_manifest(files).get('dtype', 'uint32')).newbyteorder('<')
  except (ValueError, TypeError, AttributeError) as e:
    raise DataError(f"'{files[0].parent / 'manifest.json'}' has no valid dtype: {e}") from None


def _arrayrecord_docs(files: Sequence[Path]) -> Iterator[np.ndarray]:
  """Each record's bytes -> int32 token ids `[doc_tokens]`, read through Grain's source."""
  import grain
  dtype = _record_dtype(files)
  try:
    source = grain.sources.ArrayRecordDataSource([str(f) for f in files])
  except Exception as e:  # array_record raises bare RuntimeError/ValueError on bad files
    raise DataError(f"data.path '{files[0]}' is not readable ArrayRecord: {e}") from None
  chunk = 1024  # records per read; one call per record is slow on many small documents
  for start in range(0, len(source), chunk):
    for record in source.__getitems__(range(start, min(start + chunk, len(source)))):
      yield np.frombuffer(record, dtype=dtype).astype(np.int32)


def write_arrayrecord(path, docs: Iterable[Sequence[int]], dtype='uint32') -> Path:
  """Writes one record per document: its token ids `[doc_tokens]` as little-endian `dtype` bytes.

  Also writes `manifest.json` with the dtype beside `path`, which `load_tokens` reads back.
  """
  from array_record.python import array_record_module
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  dt = np.dtype(dtype).newbyteorder('<')
  writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
  try:
    for doc in docs:
      writer.write(np.asarray(doc).astype(dt).tobytes())
  finally:
    writer.close()
  (path.parent / 'manifest.json').write_text(json.dumps({'dtype': np.dtype(dtype).name}))
  return path
