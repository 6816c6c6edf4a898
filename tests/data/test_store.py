"""Prepared stores: memory-mapped reads equal the in-memory stream; nothing is read whole."""

import json
import time
import tracemalloc

import numpy as np
import pytest

from _data_cfg import make_cfg, write_docs
from jaxlm.core.errors import DataError
from jaxlm.data import corpus, prepare as prepare_lib, store as store_lib
from jaxlm.data.packing import doc_starts
from jaxlm.data.pipeline import DataPipeline
from jaxlm.data.sources import load_tokens, open_tokens
from jaxlm.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
# Short and long documents, one of them over the (patched) piece size and without a final
# newline, so it is tokenized in several pieces and several work units.
DOCS = ['a', 'short doc', 'x' * 50 + '\n' + '第二行 line\n' * 30 + 'no newline at the end', '',
        'tail 😀', 'b\n', 'c' * 40]


@pytest.fixture(scope='module')
def corpus_dir(tmp_path_factory):
  return write_docs(tmp_path_factory.mktemp('docs'), DOCS)


@pytest.fixture(scope='module')
def stored(corpus_dir, tmp_path_factory):
  """DOCS prepared in 3-document shards with 64-byte pieces, in process and with 2 workers."""
  mp = pytest.MonkeyPatch()
  mp.setattr(corpus, 'PIECE_BYTES', 64)
  mp.setattr(prepare_lib, 'UNIT_CHARS', 100)
  out = {}
  try:
    for workers in (0, 2):
      out[workers] = tmp_path_factory.mktemp(f'store{workers}')
      prepare_lib.prepare(str(corpus_dir), out[workers], docs_per_shard=3, workers=workers)
  finally:
    mp.undo()
  return out


def _cfg(path, source='arrayrecord', **data):
  return make_cfg(source=source, path=str(path), **data).data


@pytest.mark.parametrize('bos,eos', [(False, False), (True, True), (False, True), (True, False)])
@pytest.mark.parametrize('max_docs', [0, 4])
def test_mapped_stream_equals_in_memory(corpus_dir, stored, bos, eos, max_docs):
  ref = load_tokens(_cfg(corpus_dir, 'text', add_bos=bos, add_eos=eos, max_docs=max_docs), TOK)
  manifest = json.loads((stored[0] / 'manifest.json').read_text())
  assert [s['docs'] for s in manifest['shards']] == [3, 3] and manifest['bad_records'] == {
      'empty': 1}
  for workers in (0, 2):
    store = open_tokens(_cfg(stored[workers], add_bos=bos, add_eos=eos, max_docs=max_docs), TOK)
    assert isinstance(store, store_lib.MappedStore)
    assert len(store) == len(ref) and store.num_docs == ref.num_docs
    tokens, starts = store.read(0, len(store))
    np.testing.assert_array_equal(tokens, ref.tokens)
    np.testing.assert_array_equal(starts, doc_starts(ref.doc_ids))
    # Every range, including ones across shard and piece boundaries, is the same slice.
    rng = np.random.default_rng(0)
    for lo, n in zip(rng.integers(0, len(ref), 300), rng.integers(0, 40, 300)):
      hi = min(lo + n, len(ref))
      t, d = store.read(lo, hi)
      np.testing.assert_array_equal(t, ref.tokens[lo:hi])
      np.testing.assert_array_equal(d, doc_starts(ref.doc_ids[lo:hi]))


@pytest.mark.parametrize('prefetch', [0, 3])  # 3: Grain reader threads share the store
def test_pipeline_from_store_equals_in_memory(corpus_dir, stored, prefetch):
  def batches(source, path):
    cfg = make_cfg(source=source, path=str(path), seq_len=8, val_tokens=30, prefetch=prefetch)
    pipe = DataPipeline(cfg, TOK)
    it = pipe.train_iterator()
    return [next(it) for _ in range(12)] + pipe.eval_batches()
  got, want = batches('arrayrecord', stored[2]), batches('text', corpus_dir)
  assert len(got) == 15
  for a, b in zip(got, want):
    for k in b:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _rss_file_kb() -> int:
  """File pages mapped into this process (Linux), which memory-mapping the tokens would grow."""
  for line in open('/proc/self/status'):
    if line.startswith('RssFile:'):
      return int(line.split()[1])
  return 0


def test_huge_store_opens_without_reading(tmp_path):
  """A 3-billion-token store (sparse files): open and read windows in ms and a few MB."""
  n = 3 * 10**9
  starts = np.array([0, 5, n - 2**31, n - 7, n], np.int64)  # 4 documents, offsets beyond 2**31
  with open(tmp_path / 'shard-00000.tokens', 'wb') as f:
    f.truncate(n * 2)  # uint16 zeros, stored as a hole
  np.save(tmp_path / 'shard-00000.docs.npy', starts)
  manifest = {'format': store_lib.FORMAT, 'dtype': 'uint16', 'add_bos': False,
              'add_eos': False, 'complete': True,
              'shards': [{'file': 'shard-00000.tokens', 'docs': 4, 'tokens': n, 'max_token': 0}]}
  (tmp_path / 'manifest.json').write_text(json.dumps(manifest))
  tracemalloc.start()
  t0 = time.perf_counter()
  store = open_tokens(_cfg(tmp_path, add_eos=True), TOK)
  tokens, starts = store.read(len(store) - 12, len(store))
  elapsed = time.perf_counter() - t0
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert len(store) == n + 4 and elapsed < 1.0 and peak < 2**20, (elapsed, peak)
  # The last 12 stream tokens: the end of document 2 (3 zeros + EOS), all of document 3.
  np.testing.assert_array_equal(tokens, [0, 0, 0, TOK.eos_id] + [0] * 7 + [TOK.eos_id])
  np.testing.assert_array_equal(starts, [4])
  # Windows all over the file leave no file pages resident in this process.
  before = _rss_file_kb()
  for lo in np.linspace(0, n - 2000, 200).astype(np.int64):
    assert len(store.read(int(lo), int(lo) + 1025)[0]) == 1025
  assert _rss_file_kb() - before < 4 * 1024, _rss_file_kb() - before


def test_truncated_or_missing_shard(stored, tmp_path):
  import shutil
  copy = tmp_path / 'copy'
  shutil.copytree(stored[0], copy)
  with open(copy / 'shard-00001.tokens', 'r+b') as f:
    f.truncate(10)
  with pytest.raises(DataError, match="shard 'shard-00001.tokens' is 10 bytes"):
    open_tokens(_cfg(copy), TOK)
  (copy / 'shard-00001.tokens').unlink()
  with pytest.raises(DataError, match="shard 'shard-00001.tokens' listed in manifest.json is "
                     'missing'):
    open_tokens(_cfg(copy), TOK)


def test_large_text_is_sent_to_prepare(tmp_path, monkeypatch):
  from jaxlm.data import sources
  (tmp_path / 'big.txt').write_text('x' * 3 * 2**20)
  monkeypatch.setattr(sources, 'IN_MEMORY_LIMIT_MB', 2)
  with pytest.raises(DataError) as e:
    load_tokens(_cfg(tmp_path, 'text'), TOK)
  msg = str(e.value)
  assert '\n' not in msg and 'is 3 MB of text files, more than the 2 MB' in msg
  assert f"run `jaxlm prepare --input='{tmp_path}' --output=STORE`" in msg


def test_prepare_streams_a_long_document(tmp_path, monkeypatch):
  """A single 4 MB document is tokenized in 64 KB pieces: prepare never holds it whole."""
  monkeypatch.setattr(corpus, 'PIECE_BYTES', 2**16)
  monkeypatch.setattr(prepare_lib, 'UNIT_CHARS', 2**16)
  line = 'All the world is a stage 世界\n'
  text = line * (4 * 2**20 // len(line.encode()))
  (tmp_path / 'one.txt').write_text(text)
  tracemalloc.start()
  m = prepare_lib.prepare(str(tmp_path / 'one.txt'), tmp_path / 'store', add_eos=True)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert m['docs'] == 1 and m['tokens'] == len(text.encode()) + 1
  assert peak < 2**20, peak  # ~ a few pieces; the document is 4 MB of text, 16 MB as int32
  store = open_tokens(_cfg(tmp_path / 'store', add_eos=True), TOK)
  tokens, starts = store.read(0, len(store))
  assert TOK.decode(tokens) == text and tokens[-1] == TOK.eos_id and not len(starts)


@pytest.mark.parametrize('bos,eos', [(True, True), (False, True)])
def test_many_tiny_documents(tmp_path, bos, eos):
  """3,000 one- or two-token documents in a shard: the wide search brackets take the slow path."""
  docs = [np.array([i % 200 + 1] * (1 + i % 2)) for i in range(3000)]
  writer = store_lib.ShardWriter(tmp_path, 'shard-00000.tokens', 'uint16')
  for d in docs:
    writer.add(d)
    writer.end_doc()
  manifest = {'format': store_lib.FORMAT, 'dtype': 'uint16', 'add_bos': False, 'add_eos': False,
              'complete': True, 'shards': [writer.close()]}
  (tmp_path / 'manifest.json').write_text(json.dumps(manifest))
  store = open_tokens(_cfg(tmp_path, add_bos=bos, add_eos=eos), TOK)
  wrap = [[TOK.bos_id] * bos + d.tolist() + [TOK.eos_id] * eos for d in docs]
  ref = np.concatenate(wrap)
  ref_starts = np.cumsum([len(w) for w in wrap])[:-1]
  assert len(store) == len(ref)
  for lo in list(range(0, 40)) + list(range(len(ref) - 40, len(ref))) + list(range(4000, 4100)):
    hi = min(lo + 17, len(ref))
    tokens, starts = store.read(lo, hi)
    np.testing.assert_array_equal(tokens, ref[lo:hi])
    inside = ref_starts[(ref_starts > lo) & (ref_starts < hi)] - lo
    np.testing.assert_array_equal(starts, inside)
