"""`jaxlm prepare`: a text/JSONL/Parquet corpus -> a sharded ArrayRecord token store.

    jaxlm prepare --input='corpus/*.jsonl' --format=jsonl --output=data/web \\
        --tokenizer=hf --tokenizer_path=tok/tokenizer.json --workers=8
    jaxlm train --config=configs/gpt2_small.py --config.data.path=data/web ...

Layout of `--output`, which data.source='arrayrecord' reads as it is:

    shard-00000.array_record, ...  one record per document: its token ids `[doc_tokens]`
                                   as little-endian uint16 (vocab <= 65536) or uint32
    manifest.json                  dtype, tokenizer, settings, per-shard document, token and
                                   bad-record counts; `complete` once every shard is written

Documents go to shards in input order, `--docs_per_shard` documents each, so
which documents a shard holds depends on the input and settings alone. Worker
processes tokenize and write whole shards, each under a temporary name renamed
when complete; the manifest lists finished shards, so a re-run after a kill
skips them (the input is re-read, not re-tokenized). Bad records (see
`jaxlm.data.corpus`) are counted in the manifest, never fatal.

`--add_bos` / `--add_eos` store the specials in the records; the manifest says
so and the loader then does not add them again. Without them (the default) the
loader adds specials per data.add_bos / data.add_eos at load time.
"""

import concurrent.futures as futures
import hashlib
import json
import multiprocessing
import os
import sys
import types
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
from absl import flags

from jaxlm.data import corpus
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.errors import ConfigError, DataError

MANIFEST = 'manifest.json'
_TOKENIZER = None  # per worker process, built once by _init_worker


def define_flags(fv: flags.FlagValues) -> None:
  corpus.define_input_flags(fv)
  flags.DEFINE_string('output', None, 'store directory (shards + manifest.json)', flag_values=fv)
  flags.DEFINE_enum('tokenizer', 'byte', ('byte', 'sentencepiece', 'hf'), 'tokenizer kind',
                    flag_values=fv)
  flags.DEFINE_string('tokenizer_path', '', '.model (sentencepiece) or tokenizer.json (hf)',
                      flag_values=fv)
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
  bad = ', '.join(f'{k} {v}' for k, v in m['bad_records'].items()) or 'none'
  print(f"prepared {fv.output}: {len(m['shards'])} shards ({m['skipped_shards']} already done), "
        f"{m['docs']:,} docs, {m['tokens']:,} tokens ({m['dtype']}); bad records: {bad}")
  return 0


def prepare(inputs: str, output, fmt: str = 'text', field: str = 'text', text_unit: str = 'file',
            tokenizer: str = 'byte', tokenizer_path: str = '', docs_per_shard: int = 10000,
            workers: int = 0, add_bos: bool = False, add_eos: bool = False,
            progress: bool = False) -> Dict:
  """Tokenizes `inputs` into shards under `output`; returns the final manifest (module doc).

  Adds `skipped_shards` (shards found finished by an earlier run) to the returned dict only.
  """
  out = Path(output).expanduser()
  files = corpus.match_inputs(inputs)
  tok_info = _tokenizer_info(tokenizer, tokenizer_path)
  tok = _build_tokenizer(tokenizer, tokenizer_path)
  for which, wanted in (('bos', add_bos), ('eos', add_eos)):
    if wanted and getattr(tok, f'{which}_id') is None:
      raise ConfigError(f"--add_{which} is set but tokenizer '{tok.name}' has no "
                        f'{which.upper()} token')
  manifest = {
      'dtype': 'uint16' if tok.vocab_size <= 2**16 else 'uint32',
      'add_bos': add_bos, 'add_eos': add_eos, 'complete': False,
      'tokenizer': tok_info,
      'settings': {'format': fmt, 'field': field if fmt != 'text' else None,
                   'text_unit': text_unit if fmt == 'text' else None,
                   'docs_per_shard': docs_per_shard,
                   'inputs': [[str(f.resolve()), f.stat().st_size] for f in files]},
      'shards': [], 'docs': 0, 'tokens': 0, 'bad_records': {},
  }
  done = _finished_shards(out, manifest)
  out.mkdir(parents=True, exist_ok=True)
  shards: Dict[str, Dict] = {}  # file name -> entry; names sort in shard order
  _write_manifest(out, manifest, shards, {})
  spec = (str(out), manifest['dtype'], add_bos, add_eos)
  records = corpus.read_records(files, fmt, field, text_unit)
  bar = _progress_bar(progress)
  trailing: Dict[str, int] = {}
  skipped = 0
  pool = _pool(workers, tokenizer, tokenizer_path)
  pending: Dict[futures.Future, Dict] = {}
  try:
    for index, (texts, bad) in enumerate(_group(records, docs_per_shard)):
      if not texts:  # bad records after the last document: counted, no shard
        trailing = bad
        break
      name = f'shard-{index:05d}.array_record'
      if name in done:
        was = done[name]['docs'] + done[name]['bad'].get('no_tokens', 0)
        if was != len(texts):
          raise DataError(f"--output '{out}': {name} was made from {was} documents but the "
                          f'input now gives {len(texts)}; use a new --output')
        shards[name] = done[name]
        skipped += 1
        bar.update(len(texts))
        continue
      entry = {'file': name, 'docs': len(texts), 'bad': bad}
      if pool is None:
        _finish(out, manifest, shards, entry, _write_shard(spec, name, texts), bar)
        continue
      pending[pool.submit(_write_shard, spec, name, texts)] = entry
      if len(pending) >= 2 * workers:  # bounded read-ahead: memory stays ~2 shards per worker
        _drain(pending, out, manifest, shards, bar, futures.FIRST_COMPLETED)
    _drain(pending, out, manifest, shards, bar, futures.ALL_COMPLETED)
  except OSError as e:
    raise DataError(f"--output '{out}': {e}") from None
  finally:
    bar.close()
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  manifest['complete'] = True
  _write_manifest(out, manifest, shards, trailing)
  return dict(manifest, skipped_shards=skipped)


def _group(records: Iterator[corpus.Record],
           size: int) -> Iterator[Tuple[List[str], Dict[str, int]]]:
  """Records -> (texts of one shard, bad-record counts met while filling it)."""
  texts: List[str] = []
  bad: Dict[str, int] = {}
  for r in records:
    if isinstance(r, corpus.Bad):
      corpus.count_bad(bad, r)
      continue
    texts.append(r)
    if len(texts) == size:
      yield texts, bad
      texts, bad = [], {}
  if texts or bad:
    yield texts, bad


def _drain(pending, out, manifest, shards, bar, how) -> None:
  finished, _ = futures.wait(list(pending), return_when=how)
  for f in finished:
    _finish(out, manifest, shards, pending.pop(f), f.result(), bar)


def _finish(out, manifest, shards, entry, result, bar) -> None:
  tokens, no_tokens = result
  bad = corpus.merge_counts(entry['bad'], {'no_tokens': no_tokens})
  shards[entry['file']] = dict(entry, docs=entry['docs'] - no_tokens, tokens=tokens, bad=bad)
  _write_manifest(out, manifest, shards, {})
  bar.update(entry['docs'])


def _write_manifest(out: Path, manifest: Dict, shards: Dict[str, Dict], trailing) -> None:
  """Rewrites manifest.json atomically from the finished `shards` so far."""
  manifest['shards'] = [shards[k] for k in sorted(shards)]
  manifest['docs'] = sum(s['docs'] for s in manifest['shards'])
  manifest['tokens'] = sum(s['tokens'] for s in manifest['shards'])
  manifest['bad_records'] = corpus.merge_counts(trailing, *(s['bad'] for s in manifest['shards']))
  tmp = out / (MANIFEST + '.partial')
  tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
  os.replace(tmp, out / MANIFEST)


def _finished_shards(out: Path, manifest: Dict) -> Dict[str, Dict]:
  """Shards an earlier run with the same settings finished; raises if the settings differ."""
  path = out / MANIFEST
  if not path.is_file():
    if out.is_dir() and any(out.glob('*.array_record')):
      raise DataError(f"--output '{out}' holds ArrayRecord files but no {MANIFEST}; "
                      'use a new --output')
    return {}
  try:
    old = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"'{path}' is not readable JSON: {e}") from None
  keys = ('dtype', 'add_bos', 'add_eos', 'tokenizer', 'settings')
  changed = [k for k in keys if old.get(k) != manifest[k]]
  if changed:
    raise DataError(f"--output '{out}' holds a store prepared with different "
                    f"{', '.join(changed)}; use a new --output")
  return {s['file']: s for s in old.get('shards', []) if (out / s['file']).is_file()}


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


def _write_shard(spec, name: str, texts: List[str]) -> Tuple[int, int]:
  """Tokenizes `texts` into `<out>/<name>`; returns (tokens written, texts with no tokens)."""
  from array_record.python import array_record_module  # noqa: PLC0415
  out, dtype, add_bos, add_eos = spec
  dt = np.dtype(dtype).newbyteorder('<')
  bos = [_TOKENIZER.bos_id] if add_bos else []
  eos = [_TOKENIZER.eos_id] if add_eos else []
  tmp = Path(out) / (name.split('.')[0] + '.partial')  # not matched by the loader's globs
  writer = array_record_module.ArrayRecordWriter(str(tmp), 'group_size:1')
  tokens = empty = 0
  try:
    for text in texts:
      ids = _TOKENIZER.encode(text)
      if not len(ids):
        empty += 1
        continue
      doc = np.concatenate([np.asarray(bos, dt), ids.astype(dt), np.asarray(eos, dt)])
      writer.write(doc.tobytes())
      tokens += len(doc)
  finally:
    writer.close()
  os.replace(tmp, Path(out) / name)
  return tokens, empty


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

