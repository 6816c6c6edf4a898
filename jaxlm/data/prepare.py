"""`jaxlm prepare`: a text/JSONL/Parquet corpus -> a sharded token store.

    jaxlm prepare --input='corpus/*.jsonl' --format=jsonl --output=data/web \\
        --tokenizer=hf --tokenizer_path=tok/tokenizer.json --workers=8
    jaxlm train --config=configs/gpt2_small.py --config.data.path=data/web ...

`--input` and `--output` may be on object storage (gs://, s3://): inputs are
streamed, the store is written object by object (a shard's tokens object is
committed last, after its document index; the manifest lists only committed
shards), so a killed run leaves nothing listed that is incomplete.

`--output` is a `jaxlm.data.store` directory (token shards, document index and
manifest.json with dtype, tokenizer, settings, per-shard document, token and
bad-record counts), which data.source='arrayrecord' reads as it is, window by
window.

Streaming, so memory is bounded by buffers, not by document or corpus size:
the main process reads the input in order and cuts it into work units of about
`UNIT_CHARS` characters (a text file over `corpus.PIECE_BYTES` is one document
read in pieces cut after newlines); `--workers` processes tokenize units, at
most `2 * workers` in flight; the main process appends their tokens, in input
order, to the open shard. A document's pieces stay one document (one entry in
the document index), however many units it spans.

Documents go to shards in input order, `--docs_per_shard` documents each, so
which documents a shard holds depends on the input and settings alone. Each
shard is written under a temporary name renamed when complete; the manifest
lists finished shards, so a re-run after a kill skips them (the input is
re-read, not re-tokenized). Bad records (see `jaxlm.data.corpus`) are counted in
the manifest, never fatal.

`--add_bos` / `--add_eos` store the specials in the records; the manifest says
so and the loader then does not add them again. Without them (the default) the
loader adds specials per data.add_bos / data.add_eos at load time.
"""

import collections
import concurrent.futures as futures
import hashlib
import json
import multiprocessing
import os
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from absl import flags

from jaxlm.core import storage
from jaxlm.core.errors import ConfigError, DataError
from jaxlm.data import corpus
from jaxlm.data import store as store_lib
from jaxlm.data.tokenizers import get_tokenizer

MANIFEST = store_lib.MANIFEST
UNIT_CHARS = 1 << 20  # characters per work unit sent to a tokenizer process
_TOKENIZER = None  # per worker process, built once by _init_worker


def define_flags(fv: flags.FlagValues) -> None:
  corpus.define_input_flags(fv)
  flags.DEFINE_string('output', None, 'store directory (shards + manifest.json)', flag_values=fv)
  flags.DEFINE_enum('tokenizer', 'byte', ('byte', 'char', 'sentencepiece', 'hf'), 'tokenizer kind',
                    flag_values=fv)
  flags.DEFINE_string('tokenizer_path', '', '.model (sentencepiece), tokenizer.json (hf) or a '
                      'text file whose characters are the alphabet (char)', flag_values=fv)
  flags.DEFINE_integer('docs_per_shard', 10000, 'documents per shard', lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer('workers', min(os.cpu_count() or 1, 16),
                       'tokenizer processes (0 = in this process)', lower_bound=0, flag_values=fv)
  flags.DEFINE_bool('add_bos', False, 'store BOS before every document', flag_values=fv)
  flags.DEFINE_bool('add_eos', False, 'store EOS after every document', flag_values=fv)
  flags.DEFINE_bool('progress', True, 'show a progress bar', flag_values=fv)


def run(fv: flags.FlagValues, args: List[str]) -> int:
  if args:
    raise ConfigError(f"jaxlm prepare takes no positional arguments, got '{' '.join(args)}'")
  for name in ('input', 'output'):
    if not fv[name].value:
      raise ConfigError(f'jaxlm prepare needs --{name}')
  m = prepare(fv.input, fv.output, fmt=fv.format, field=fv.field, text_unit=fv.text_unit,
              tokenizer=fv.tokenizer, tokenizer_path=fv.tokenizer_path,
              docs_per_shard=fv.docs_per_shard, workers=fv.workers, add_bos=fv.add_bos,
              add_eos=fv.add_eos, progress=fv.progress)
  report(fv.input, fv.output, m)
  return 0


def report(inputs: str, output, m: Dict) -> None:
  """The one-line summary both runners print; a store with no document is a DataError."""
  bad = ', '.join(f'{k} {v}' for k, v in m['bad_records'].items()) or 'none'
  if not m['docs'] or not m['tokens']:  # an empty store would only fail later, at train
    raise DataError(f"--input '{inputs}' gave no usable document ({m['docs']} docs, "
                    f"{m['tokens']} tokens; bad records: {bad}); check --format, --field and "
                    f"--text_unit (the store at '{output}' is empty)")
  print(f"prepared {output}: {len(m['shards'])} shards ({m['skipped_shards']} already done), "
        f"{m['docs']:,} docs, {m['tokens']:,} tokens ({m['dtype']}); bad records: {bad}")


def prepare(inputs: str, output, fmt: str = 'text', field: str = 'text', text_unit: str = 'file',
            tokenizer: str = 'byte', tokenizer_path: str = '', docs_per_shard: int = 10000,
            workers: int = 0, add_bos: bool = False, add_eos: bool = False,
            progress: bool = False) -> Dict:
  """Tokenizes `inputs` into shards under `output`; returns the final manifest (module doc).

  Adds `skipped_shards` (shards found finished by an earlier run) to the returned dict only.
  """
  out, files, tok, manifest, done = begin(inputs, output, fmt, field, text_unit, tokenizer,
                                          tokenizer_path, docs_per_shard, add_bos, add_eos)
  specials = (tok.bos_id if add_bos else None, tok.eos_id if add_eos else None)
  shards = _Shards(out, manifest, done, docs_per_shard, specials, _progress_bar(progress))
  pool = _pool(workers, tokenizer, tokenizer_path)
  pending = collections.deque()  # (future or result, [doc index per piece]), input order
  unit: List[str] = []
  unit_docs: List[int] = []

  def submit():
    task = (_tokenize, manifest['dtype'], list(unit))
    result = pool.submit(*task) if pool is not None else task[0](*task[1:])
    pending.append((result, list(unit_docs)))
    unit.clear()
    unit_docs.clear()
    while len(pending) > 2 * max(workers, 0):  # bounded read-ahead: ~2 units per worker
      _write(shards, *pending.popleft())

  try:
    size = 0
    for record in corpus.read_records(files, fmt, field, text_unit):
      if isinstance(record, corpus.Bad):
        shards.bad(record)
        continue
      if not shards.new_doc():  # its shard was finished by an earlier run
        continue
      for piece in corpus.texts(record):
        unit.append(piece)
        unit_docs.append(shards.input_docs - 1)
        size += len(piece)
        if size >= UNIT_CHARS:
          submit()
          size = 0
    if unit:
      submit()
    while pending:
      _write(shards, *pending.popleft())
    shards.finish()
  except OSError as e:
    raise DataError(f"--output '{out}': {e}") from None
  finally:
    shards.bar.close()
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  manifest['complete'] = True
  _write_manifest(out, manifest, shards.entries, shards.trailing())
  return dict(manifest, skipped_shards=shards.skipped)


def begin(inputs: str, output, fmt: str, field: str, text_unit: str, tokenizer: str,
          tokenizer_path: str, docs_per_shard: int, add_bos: bool, add_eos: bool):
  """Checks the settings, lists the inputs, writes the incomplete manifest (both runners).

  Returns (output folder or URI, input files, tokenizer, manifest, shards an earlier run
  with the same settings finished).
  """
  remote = storage.is_remote(output)
  if remote:
    storage.check(output)
  out = str(output).rstrip('/') if remote else Path(output).expanduser()
  files = corpus.match_inputs(inputs)
  tok_info = _tokenizer_info(tokenizer, tokenizer_path)
  tok = _build_tokenizer(tokenizer, tokenizer_path)
  for which, wanted in (('bos', add_bos), ('eos', add_eos)):
    if wanted and getattr(tok, f'{which}_id') is None:
      raise ConfigError(f"--add_{which} is set but tokenizer '{tok.name}' has no "
                        f'{which.upper()} token')
  manifest = {
      'format': store_lib.FORMAT,
      'dtype': 'uint16' if tok.vocab_size <= 2**16 else 'uint32',
      'add_bos': add_bos, 'add_eos': add_eos, 'complete': False,
      'tokenizer': tok_info,
      'settings': {'format': fmt, 'field': field if fmt != 'text' else None,
                   'text_unit': text_unit if fmt == 'text' else None,
                   'docs_per_shard': docs_per_shard,
                   'inputs': [corpus.describe(f) for f in files]},
      'shards': [], 'docs': 0, 'tokens': 0, 'bad_records': {},
  }
  done = _finished_shards(out, manifest)
  if not remote:
    out.mkdir(parents=True, exist_ok=True)
  _write_manifest(out, manifest, {}, {})
  return out, files, tok, manifest, done


def _write(shards: '_Shards', result, docs: List[int]) -> None:
  pieces = result.result() if isinstance(result, futures.Future) else result
  for doc, ids in zip(docs, pieces):
    shards.add(doc, ids)


class _Shards:
  """The main process's side of prepare: documents -> shard files, in input order.

  `new_doc()` / `bad()` follow the input as it is read (to number documents and
  attribute bad records); `add()` receives tokenized pieces later, in the same
  order, and rolls over to the next shard every `docs_per_shard` input documents.
  """

  def __init__(self, out, manifest: Dict, done: Dict[str, Dict], docs_per_shard: int,
               specials: Tuple[Optional[int], Optional[int]], bar):
    self.out, self.manifest, self.done, self.per = out, manifest, done, docs_per_shard
    self.specials, self.bar = specials, bar
    self.input_docs = 0  # documents read from the input so far
    self.entries: Dict[str, Dict] = {}  # finished shards by file name (names sort in order)
    self.skipped = 0
    self._bad: Dict[int, Dict[str, int]] = collections.defaultdict(dict)  # by shard index
    self._writer: Optional[store_lib.ShardWriter] = None
    self._shard = -1  # index of the open writer's shard
    self._doc = -1  # input index of the open document
    self._no_tokens = 0  # documents of the open shard that had no tokens

  @staticmethod
  def name(index: int) -> str:
    return f'shard-{index:05d}{store_lib.TOKENS_SUFFIX}'

  def bad(self, record: corpus.Bad) -> None:
    corpus.count_bad(self._bad[self.input_docs // self.per], record)

  def new_doc(self) -> bool:
    """Counts one input document; False if its shard is already done (nothing to write)."""
    index = self.input_docs // self.per
    self.input_docs += 1
    name = self.name(index)
    if name not in self.done:
      return True
    have = self.input_docs - index * self.per  # input documents of this shard so far
    if have == self._made_from(name):
      self.entries[name] = self.done[name]
      self.skipped += 1
      self.bar.update(have)
    elif have > self._made_from(name):
      self._mismatch(name, 'more')
    return False

  def _made_from(self, name: str) -> int:
    entry = self.done[name]
    return entry['docs'] + entry['bad'].get('no_tokens', 0)

  def _mismatch(self, name: str, gives) -> None:
    raise DataError(f"--output '{self.out}': {name} was made from {self._made_from(name)} "
                    f'documents but the input now gives {gives}; use a new --output')

  def add(self, doc: int, ids) -> None:
    if doc != self._doc:
      self._end_doc()
      self._doc = doc
      if doc // self.per != self._shard:
        self._close()
        self._shard = doc // self.per
        self._writer = store_lib.ShardWriter(self.out, self.name(self._shard),
                                             self.manifest['dtype'], *self.specials)
    self._writer.add(ids)

  def _end_doc(self) -> None:
    if self._writer is not None and self._doc >= 0:
      self._no_tokens += not self._writer.end_doc()
      self.bar.update(1)

  def _close(self) -> None:
    if self._writer is None:
      return
    entry = self._writer.close()
    bad = corpus.merge_counts(self._bad.pop(self._shard, {}), {'no_tokens': self._no_tokens})
    self.entries[entry['file']] = dict(entry, bad=bad)
    _write_manifest(self.out, self.manifest, self.entries, {})
    self._writer, self._no_tokens = None, 0

  def finish(self) -> None:
    """Closes the last shard; checks a resumed store's last shard still matches the input."""
    self._end_doc()
    self._close()
    last = (self.input_docs - 1) // self.per
    name = self.name(last)
    if self.input_docs and name in self.done and name not in self.entries:
      self._mismatch(name, self.input_docs - last * self.per)

  def trailing(self) -> Dict[str, int]:
    """Bad records after the last document, in no shard."""
    return self._bad.get(self.input_docs // self.per, {}) if self.input_docs % self.per == 0 \
        else {}


def _write_manifest(out, manifest: Dict, shards: Dict[str, Dict], trailing) -> None:
  """Rewrites manifest.json atomically from the finished `shards` so far."""
  manifest['shards'] = [shards[k] for k in sorted(shards)]
  manifest['docs'] = sum(s['docs'] for s in manifest['shards'])
  manifest['tokens'] = sum(s['tokens'] for s in manifest['shards'])
  manifest['bad_records'] = corpus.merge_counts(trailing, *(s['bad'] for s in manifest['shards']))
  text = json.dumps(manifest, indent=1, ensure_ascii=False)
  if storage.is_remote(out):
    storage.write_atomic(storage.join(out, MANIFEST), text)  # one PUT: whole or absent
    return
  tmp = out / (MANIFEST + '.partial')
  tmp.write_text(text)
  os.replace(tmp, out / MANIFEST)


def _finished_shards(out, manifest: Dict) -> Dict[str, Dict]:
  """Shards an earlier run with the same settings finished; raises if the settings differ."""
  # One listing (remote: one request) tells which shard files exist.
  present = storage.list_sizes(out) if storage.is_remote(out) or out.is_dir() else {}
  path = storage.join(out, MANIFEST) if storage.is_remote(out) else out / MANIFEST
  if MANIFEST not in present:
    if any(n.endswith(('.array_record', store_lib.TOKENS_SUFFIX)) for n in present):
      raise DataError(f"--output '{out}' holds shard files but no {MANIFEST}; "
                      'use a new --output')
    return {}
  try:
    old = json.loads(storage.read_text(path) if storage.is_remote(out) else path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"'{path}' is not readable JSON: {e}") from None
  keys = ('format', 'dtype', 'add_bos', 'add_eos', 'tokenizer', 'settings')
  changed = [k for k in keys if old.get(k) != manifest[k]]
  if changed:
    raise DataError(f"--output '{out}' holds a store prepared with different "
                    f"{', '.join(changed)}; use a new --output")
  return {s['file']: s for s in old.get('shards', [])
          if s['file'] in present and store_lib.docs_file(s['file']) in present}


def _tokenizer_info(kind: str, path: str) -> Dict:
  info = {'kind': kind}
  if kind != 'byte' and path:
    p = Path(path).expanduser().resolve()
    f = p / 'tokenizer.json' if p.is_dir() else p
    info['path'] = str(p)
    # The content hash, so a retrained tokenizer at the same path is not mistaken for the old.
    info['sha256'] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None
  return info


def _build_tokenizer(kind: str, path: str):
  try:
    return get_tokenizer(types.SimpleNamespace(tokenizer=kind, tokenizer_path=path))
  except DataError as e:
    # Same checks as training's, worded for this command's flags.
    raise DataError(str(e).replace('data.tokenizer', '--tokenizer')) from None


def _init_worker(kind: str, path: str, in_pool: bool = True) -> None:
  global _TOKENIZER
  if in_pool:
    # Parallelism comes from processes; Rust-side threads in each would oversubscribe the cores.
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  _TOKENIZER = _build_tokenizer(kind, path)


def _pool(workers: int, kind: str, path: str):
  if workers == 0:
    _init_worker(kind, path, in_pool=False)
    return None
  # spawn, not fork: the caller may hold JAX or tokenizer threads that a fork would copy locked.
  return futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'),
                                     initializer=_init_worker, initargs=(kind, path))


def _tokenize(dtype: str, pieces: List[str]) -> List[np.ndarray]:
  """Token ids of each text piece `[piece_tokens]`, in the store's `dtype` (compact to return)."""
  return [_TOKENIZER.encode(p).astype(dtype) for p in pieces]


class _NoBar:
  def update(self, n):
    pass

  def close(self):
    pass


def _progress_bar(enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm  # noqa: PLC0415
  return tqdm(desc='prepare', unit='doc', unit_scale=True, file=sys.stderr, dynamic_ncols=True)

