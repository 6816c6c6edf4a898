"""`jaxlm prepare --runner=beam`: the same token store, written by an Apache Beam pipeline.

    jaxlm prepare --runner=beam --input='gs://b/raw/*.parquet' --format=parquet \\
        --output=gs://b/store --tokenizer=hf --tokenizer_path=tok/tokenizer.json \\
        --beam_options='--runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp'

Any Beam runner (`--beam_options` is passed to Beam as it is; without a
`--runner` there, the DirectRunner in multi-processing mode with `--workers`
processes). The store is the single-machine `jaxlm prepare`'s, shard for shard
and byte for byte, for the same inputs and settings:

  1. each input file is read and tokenized on a worker (the tokenizer is built
     once per worker, in `DoFn.setup`), emitting its good records' tokens in chunks
     of `_CHUNK_DOCS` keyed by (file, number of the chunk's first good record in the
     file), every bad record keyed by the good records before it, and the file's
     good-record count;
  2. the counts give each file's first global document number (a side input), so a
     document's shard is `global number // docs_per_shard`, as in the input-order
     single-machine run, and a bad record lands in the shard it would there;
  3. each shard's documents are grouped, sorted by number and written by a worker
     (`store.ShardWriter`: tokens committed last, also on object storage);
  4. the launcher writes manifest.json from the shard entries; bad-record counts
     are Beam metrics (`jaxlm/bad_<kind>`), and the manifest's totals are the
     metrics' committed values.

Memory per worker: a chunk of documents in flight, or one shard's in the write.
"""

import json
import shlex
from pathlib import Path
from typing import Dict, List, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from jaxlm.core import storage
from jaxlm.core.errors import DataError
from jaxlm.data import corpus
from jaxlm.data import prepare as prepare_lib
from jaxlm.data import store as store_lib

_NAMESPACE = 'jaxlm'
_ENTRIES = '.beam-entries'  # shard entries written by workers, read by the launcher
# Documents per element between the steps: Beam's cost is per element, and a chunk bounds a
# worker's memory however large an input file is.
_CHUNK_DOCS = 1024


def options(beam_options: str, workers: int) -> PipelineOptions:
  """PipelineOptions from `--beam_options`; DirectRunner multi-processing by default."""
  argv = shlex.split(beam_options or '')
  if not any(a.startswith('--runner') for a in argv):
    argv = ['--runner=DirectRunner', '--direct_running_mode=multi_processing',
            f'--direct_num_workers={max(workers, 1)}'] + argv
  return PipelineOptions(argv)


def run(inputs: str, output, beam_options: str = '', fmt: str = 'text', field: str = 'text',
        text_unit: str = 'file', tokenizer: str = 'byte', tokenizer_path: str = '',
        docs_per_shard: int = 10000, workers: int = 2, add_bos: bool = False,
        add_eos: bool = False) -> Dict:
  """Prepares `inputs` into the store `output` on Beam; returns the manifest (module doc)."""
  folder, files, tok, manifest, _ = prepare_lib.begin(
      inputs, output, fmt, field, text_unit, tokenizer, tokenizer_path, docs_per_shard,
      add_bos, add_eos)
  out = str(folder)
  _remove_entries(out)  # a killed earlier run's
  specials = (tok.bos_id if add_bos else None, tok.eos_id if add_eos else None)
  per = docs_per_shard
  with beam.Pipeline(options=options(beam_options, workers)) as p:
    parts = (p | 'files' >> beam.Create(list(enumerate(str(f) for f in files)))
             | 'spread' >> beam.Reshuffle()
             | 'tokenize' >> beam.ParDo(_ReadTokenize(fmt, field, text_unit, tokenizer,
                                                      tokenizer_path, manifest['dtype']))
             .with_outputs('bad', 'count', main='docs'))
    firsts = beam.pvalue.AsSingleton(parts.count | 'counts' >> beam.combiners.ToList()
                                     | 'firsts' >> beam.Map(_first_docs))
    docs = parts.docs | 'number' >> beam.FlatMap(_by_shard, firsts, per)
    bad = parts.bad | 'place' >> beam.Map(lambda b, f: ((f[b[0]] + b[1]) // per, b[2]), firsts)
    _ = ({'docs': docs, 'bad': bad} | 'group' >> beam.CoGroupByKey()
         | 'write' >> beam.ParDo(_WriteShard(out, manifest['dtype'], specials)))
  entries = _read_entries(out)
  trailing = entries.pop('trailing', {}).get('bad', {})
  counted = corpus.merge_counts(trailing, *(e['bad'] for e in entries.values()))
  metrics = _metric_totals(p.result)
  if metrics is not None and corpus.merge_counts(metrics) != counted:
    raise DataError(f'Beam metrics {metrics} disagree with the shards written {counted}')
  manifest['complete'] = True
  prepare_lib._write_manifest(folder, manifest, entries, trailing)  # noqa: SLF001
  _remove_entries(out)
  return dict(manifest, skipped_shards=0)


def _first_docs(counts: List) -> Dict[int, int]:
  """{file index: global number of its first good record} from [(file, good records)]."""
  firsts, at = {}, 0
  for f, n in sorted(counts):
    firsts[f] = at
    at += n
  firsts[-1] = at  # total documents
  return firsts


def _by_shard(chunk, firsts: Dict[int, int], per: int):
  """(file, first good record, [tokens]) -> (shard, (first global number, [tokens])) pieces."""
  index, first, docs = chunk
  at, i = firsts[index] + first, 0
  while i < len(docs):
    shard = (at + i) // per
    n = min(len(docs) - i, (shard + 1) * per - (at + i))
    yield shard, (at + i, docs[i:i + n])
    i += n


class _ReadTokenize(beam.DoFn):
  """One input file -> its documents' tokens, bad records and good-record count."""

  def __init__(self, fmt, field, text_unit, kind, path, dtype):
    super().__init__()
    self.args = (fmt, field, text_unit)
    self.kind, self.path, self.dtype = kind, path, dtype
    self._tok = None

  def setup(self):
    # Once per worker (DoFn instances are reused across bundles).
    self._tok = prepare_lib._build_tokenizer(self.kind, self.path)  # noqa: SLF001

  def process(self, item):
    index, uri = item
    path = uri if storage.is_remote(uri) else Path(uri)
    good, chunk = 0, []
    for record in corpus.read_records([path], *self.args):
      if isinstance(record, corpus.Bad):
        beam.metrics.Metrics.counter(_NAMESPACE, f'bad_{record.kind}').inc()
        yield beam.pvalue.TaggedOutput('bad', (index, good, record.kind))
        continue
      pieces = [self._tok.encode(t).astype(self.dtype) for t in corpus.texts(record)]
      chunk.append(np.concatenate(pieces) if pieces else np.zeros(0, self.dtype))
      good += 1
      if len(chunk) == _CHUNK_DOCS:
        yield (index, good - len(chunk), chunk)
        chunk = []
    if chunk:
      yield (index, good - len(chunk), chunk)
    yield beam.pvalue.TaggedOutput('count', (index, good))


class _WriteShard(beam.DoFn):
  """(shard, {'docs': [(number, tokens)], 'bad': [kind]}) -> the shard, written."""

  def __init__(self, out: str, dtype: str, specials):
    super().__init__()
    self.out, self.dtype, self.specials = out, dtype, specials

  def process(self, item):
    shard, groups = item
    docs = [ids for _, chunk in sorted(groups['docs'], key=lambda d: d[0]) for ids in chunk]
    bad: Dict[str, int] = {}
    for kind in groups['bad']:
      bad[kind] = bad.get(kind, 0) + 1
    if not docs:  # bad records after the last document: in no shard
      _write_entry(self.out, 'trailing', {'bad': bad})
      return
    name = f'shard-{shard:05d}{store_lib.TOKENS_SUFFIX}'
    folder = self.out if storage.is_remote(self.out) else Path(self.out)
    writer = store_lib.ShardWriter(folder, name, self.dtype, *self.specials)
    no_tokens = 0
    for ids in docs:
      writer.add(ids)
      no_tokens += not writer.end_doc()
    if no_tokens:
      beam.metrics.Metrics.counter(_NAMESPACE, 'bad_no_tokens').inc(no_tokens)
    entry = dict(writer.close(), bad=corpus.merge_counts(bad, {'no_tokens': no_tokens}))
    _write_entry(self.out, name, entry)
    yield name


def _entries_dir(out: str) -> str:
  return storage.join(out, _ENTRIES)


def _write_entry(out: str, name: str, entry: Dict) -> None:
  storage.write_atomic(storage.join(_entries_dir(out), name + '.json'), json.dumps(entry))


def _read_entries(out: str) -> Dict[str, Dict]:
  folder = _entries_dir(out)
  names = sorted(storage.list_sizes(folder)) if storage.is_remote(out) or \
      Path(folder).is_dir() else []
  return {n[:-len('.json')]: json.loads(storage.read_text(storage.join(folder, n)))
          for n in names if n.endswith('.json')}


def _remove_entries(out: str) -> None:
  folder = _entries_dir(out)
  names = storage.list_sizes(folder) if storage.is_remote(out) or Path(folder).is_dir() else {}
  for n in names:
    storage.remove(storage.join(folder, n))
  if not storage.is_remote(out) and Path(folder).is_dir():
    Path(folder).rmdir()


def _metric_totals(result) -> Optional[Dict[str, int]]:
  """{kind: count} of the committed `jaxlm/bad_*` counters, or None if the runner has none."""
  try:
    counters = result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE))['counters']
  except (NotImplementedError, AttributeError, KeyError):
    return None
  totals: Dict[str, int] = {}
  for c in counters:
    name = c.key.metric.name
    if name.startswith('bad_'):
      value = c.committed if c.committed is not None else c.attempted
      totals[name[4:]] = totals.get(name[4:], 0) + int(value or 0)
  return totals
