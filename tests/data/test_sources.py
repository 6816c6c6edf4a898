import json
import sysconfig
import time

import numpy as np
import pytest

from _data_cfg import make_cfg, write_docs
from jaxlm.core.errors import DataError
from jaxlm.data.sources import load_tokens, write_arrayrecord
from jaxlm.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
DOCS = ['first doc', '第二个文档', 'third']


def _expected(docs, bos=False, eos=True):
  tokens, ids = [], []
  for i, doc in enumerate(docs):
    t = ([TOK.bos_id] if bos else []) + list(doc.encode('utf-8')) + ([TOK.eos_id] if eos else [])
    tokens += t
    ids += [i] * len(t)
  return np.array(tokens, np.int32), np.array(ids, np.int32)


def _check(store, docs, **specials):
  tokens, ids = _expected(docs, **specials)
  assert store.tokens.dtype == np.int32 and store.doc_ids.dtype == np.int32
  np.testing.assert_array_equal(store.tokens, tokens)
  np.testing.assert_array_equal(store.doc_ids, ids)
  assert store.num_docs == len(docs)


def test_text_file_dir_and_glob(tmp_path):
  folder = write_docs(tmp_path / 'corpus', DOCS)
  (folder / 'notes.md').write_text('not a .txt file')
  write_docs(folder / 'sub', ['nested'])  # sorts after doc_*.txt
  _check(load_tokens(make_cfg(path=str(folder)).data, TOK), DOCS + ['nested'])
  _check(load_tokens(make_cfg(path=str(folder / 'doc_001.txt')).data, TOK), DOCS[1:2])
  _check(load_tokens(make_cfg(path=str(folder / 'doc_00[02].txt')).data, TOK), DOCS[::2])


def test_text_specials_and_max_docs(tmp_path):
  folder = write_docs(tmp_path, DOCS)
  store = load_tokens(make_cfg(path=str(folder), add_bos=True, add_eos=False).data, TOK)
  _check(store, DOCS, bos=True, eos=False)
  _check(load_tokens(make_cfg(path=str(folder), max_docs=2).data, TOK), DOCS[:2])


def test_jsonl_skips_bad_lines(tmp_path):
  lines = [json.dumps({'text': DOCS[0], 'id': 1}), 'not json', json.dumps({'body': 'x'}),
           '', json.dumps({'text': 7}), json.dumps(['text']), json.dumps({'text': DOCS[1]})]
  (tmp_path / 'a.jsonl').write_text('\n'.join(lines) + '\n')
  (tmp_path / 'b.jsonl').write_text(json.dumps({'content': DOCS[2]}) + '\n')
  store = load_tokens(make_cfg(source='jsonl', path=str(tmp_path)).data, TOK)
  _check(store, DOCS[:2])
  assert store.skipped == 5
  store = load_tokens(
      make_cfg(source='jsonl', path=str(tmp_path / 'b.jsonl'), jsonl_field='content').data, TOK)
  _check(store, DOCS[2:])


@pytest.mark.parametrize('dtype', ['uint32', 'uint16'])
def test_arrayrecord(tmp_path, dtype):
  docs = [TOK.encode(d) for d in DOCS]
  write_arrayrecord(tmp_path / 'shard-0.array_record', docs[:2], dtype)
  write_arrayrecord(tmp_path / 'shard-1.array_record', docs[2:], dtype)
  assert json.loads((tmp_path / 'manifest.json').read_text()) == {'dtype': dtype}
  store = load_tokens(make_cfg(source='arrayrecord', path=str(tmp_path)).data, TOK)
  _check(store, DOCS)
  store = load_tokens(make_cfg(source='arrayrecord', path=str(tmp_path / 'shard-1*')).data, TOK)
  _check(store, DOCS[2:])


def test_arrayrecord_without_manifest_is_uint32(tmp_path):
  path = write_arrayrecord(tmp_path / 'd.array_record', [[1, 2, 70000]])
  (tmp_path / 'manifest.json').unlink()
  with pytest.raises(DataError, match='token id 70000 >= vocab size 258'):
    load_tokens(make_cfg(source='arrayrecord', path=str(path)).data, TOK)


def test_pystdlib_fast_and_clean():
  start = time.perf_counter()
  store = load_tokens(make_cfg(source='pystdlib').data, TOK)
  elapsed = time.perf_counter() - start
  assert elapsed < 5.0, f'stdlib load took {elapsed:.1f}s'
  assert store.num_docs > 100 and len(store) > 1_000_000
  assert store.description == sysconfig.get_paths()['stdlib']
  text = TOK.decode(store.tokens[:200_000])
  assert 'def ' in text and 'import ' in text
  # Document boundaries are where EOS sits.
  eos_at = np.flatnonzero(store.tokens == TOK.eos_id)
  assert len(eos_at) == store.num_docs
  np.testing.assert_array_equal(store.doc_ids[eos_at], np.arange(store.num_docs))


def test_pystdlib_max_docs_is_deterministic():
  a = load_tokens(make_cfg(source='pystdlib', max_docs=5).data, TOK)
  b = load_tokens(make_cfg(source='pystdlib', max_docs=5).data, TOK)
  assert a.num_docs == 5
  np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize('source', ['text', 'jsonl', 'arrayrecord'])
def test_missing_path(tmp_path, source):
  missing = tmp_path / 'nope'
  with pytest.raises(DataError, match=f"data.path '{missing}' does not exist"):
    load_tokens(make_cfg(source=source, path=str(missing)).data, TOK)
  with pytest.raises(DataError, match='data.path is empty'):
    load_tokens(make_cfg(source=source, path='').data, TOK)


def test_no_files_and_no_tokens(tmp_path):
  (tmp_path / 'readme.md').write_text('hi')
  with pytest.raises(DataError, match=f"data.path '{tmp_path}' matched no files"):
    load_tokens(make_cfg(path=str(tmp_path)).data, TOK)
  with pytest.raises(DataError, match='matched no files'):
    load_tokens(make_cfg(path=str(tmp_path / '*.txt')).data, TOK)
  write_docs(tmp_path, ['', ''])
  with pytest.raises(DataError, match=f"data.path '{tmp_path}' yielded zero tokens"):
    load_tokens(make_cfg(path=str(tmp_path)).data, TOK)
  (tmp_path / 'x.jsonl').write_text('garbage\n')
  with pytest.raises(DataError, match='yielded zero tokens'):
    load_tokens(make_cfg(source='jsonl', path=str(tmp_path / 'x.jsonl')).data, TOK)


def test_bad_source_and_missing_special(tmp_path):
  with pytest.raises(DataError, match="data.source 'csv'"):
    load_tokens(make_cfg(source='csv').data, TOK)

  class NoBos(ByteTokenizer):
    name = 'nobos'
    bos_id = None

  write_docs(tmp_path, DOCS)
  with pytest.raises(DataError, match="tokenizer 'nobos' has no BOS"):
    load_tokens(make_cfg(path=str(tmp_path), add_bos=True).data, NoBos())
