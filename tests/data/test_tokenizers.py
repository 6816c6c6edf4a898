import numpy as np
import pytest

from _data_cfg import SHAKESPEARE, make_cfg
from jaxlm.core.errors import DataError
from jaxlm.data.tokenizers import ByteTokenizer, get_tokenizer

TEXTS = ['hello, world\n', '中文分词测试：你好，世界！', 'mixed ascii 和 中文 😀 tabs\there', '']


@pytest.mark.parametrize('text', TEXTS)
def test_byte_round_trip(text):
  tok = get_tokenizer(make_cfg(tokenizer='byte').data)
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert len(ids) == len(text.encode('utf-8'))
  assert tok.decode(ids) == text


def test_byte_specials_and_raw_bytes():
  tok = ByteTokenizer()
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
  raw = bytes(range(256)) + b'\xff\xfe\x80'
  ids = tok.encode_bytes(raw)
  assert tok.decode_bytes(ids) == raw
  assert tok.decode([tok.bos_id, *tok.encode('ok'), tok.eos_id]) == 'ok'
  # A sample cut mid-character must still decode.
  assert tok.decode(tok.encode('你')[:2]) == '\ufffd'


def _spm_model(tmp_path):
  import sentencepiece as spm
  words = ['alpha', 'beta', 'gamma', 'delta', 'token', 'model', 'jax', 'data', 'hello', 'world']
  rng = np.random.default_rng(0)
  lines = [' '.join(rng.choice(words, size=8)) for _ in range(300)]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(tmp_path / 'sp'), vocab_size=320,
      model_type='bpe', character_coverage=1.0, byte_fallback=True, minloglevel=2)
  return tmp_path / 'sp.model'


def test_sentencepiece_round_trip(tmp_path):
  path = _spm_model(tmp_path)
  tok = get_tokenizer(make_cfg(tokenizer='sentencepiece', tokenizer_path=str(path)).data)
  assert tok.vocab_size == 320 and tok.name == 'sentencepiece:sp.model'
  text = 'hello jax world of data'
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) < len(text)
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
  assert tok.decode(tok.encode('中')) == '中'  # via byte fallback


def _hf_json(tmp_path, specials):
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(['the quick brown fox jumps over the lazy dog'] * 50, trainer)
  tok.save(str(tmp_path / 'tokenizer.json'))
  return tmp_path / 'tokenizer.json'


def test_hf_round_trip(tmp_path):
  path = _hf_json(tmp_path, ['<s>', '</s>'])
  tok = get_tokenizer(make_cfg(tokenizer='hf', tokenizer_path=str(path)).data)
  assert (tok.bos_id, tok.eos_id) == (0, 1)
  for text in ['the lazy fox', 'unseen 中文 text!']:
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert tok.encode(text)[0] != tok.bos_id  # no specials added
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
  # A directory holding tokenizer.json works too.
  assert get_tokenizer(make_cfg(tokenizer='hf', tokenizer_path=str(tmp_path)).data).vocab_size \
      == tok.vocab_size


def test_hf_without_specials(tmp_path):
  tok = get_tokenizer(make_cfg(tokenizer='hf', tokenizer_path=str(_hf_json(tmp_path, []))).data)
  assert tok.bos_id is None and tok.eos_id is None


@pytest.mark.parametrize('kind,path,message', [
    ('sentencepiece', '', 'needs data.tokenizer_path'),
    ('hf', '/no/such/tokenizer.json', "'/no/such/tokenizer.json' does not exist"),
    ('wordpiece', '', "data.tokenizer 'wordpiece'"),
])
def test_tokenizer_errors(kind, path, message):
  with pytest.raises(DataError, match=message):
    get_tokenizer(make_cfg(tokenizer=kind, tokenizer_path=path).data)


def test_bad_tokenizer_files(tmp_path):
  bad = tmp_path / 'bad.model'
  bad.write_text('not a model')
  with pytest.raises(DataError, match='not a SentencePiece model'):
    get_tokenizer(make_cfg(tokenizer='sentencepiece', tokenizer_path=str(bad)).data)
  with pytest.raises(DataError, match='not a tokenizer.json'):
    get_tokenizer(make_cfg(tokenizer='hf', tokenizer_path=str(bad)).data)
  with pytest.raises(DataError, match='has no tokenizer.json'):
    get_tokenizer(make_cfg(tokenizer='hf', tokenizer_path=str(tmp_path)).data)


def test_char_vocabulary_is_nanogpts_shakespeare_char():
  """The alphabet of the text, sorted, as nanoGPT's prepare.py builds its 65 ids."""
  text = SHAKESPEARE.read_text(encoding='utf-8')
  # data.tokenizer_path '' -> the alphabet of data.path
  tok = get_tokenizer(make_cfg(tokenizer='char', path=str(SHAKESPEARE)).data)
  chars = sorted(set(text))
  assert tok.vocab_size == len(chars) == 65
  assert (tok.bos_id, tok.eos_id) == (None, None)
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text)
  stoi = {c: i for i, c in enumerate(chars)}
  assert ids[:2000].tolist() == [stoi[c] for c in text[:2000]]
  assert tok.decode(ids) == text
  assert tok.decode([-1, *tok.encode('ROMEO:'), 65]) == 'ROMEO:'  # out-of-range ids skipped


def test_char_alphabet_from_a_file_with_any_unicode(tmp_path):
  alphabet = tmp_path / 'alphabet.txt'
  alphabet.write_text('ba 中😀\n', encoding='utf-8')
  tok = get_tokenizer(make_cfg(tokenizer='char', tokenizer_path=str(alphabet)).data)
  assert tok.vocab_size == 6
  assert tok.encode('\n ab中😀').tolist() == [0, 1, 2, 3, 4, 5]  # code point order
  assert tok.decode(tok.encode('😀ab 中\n')) == '😀ab 中\n'
  with pytest.raises(DataError, match="character 'c' is not in the 6-character alphabet"):
    tok.encode('abc')
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(DataError, match='is empty'):
    get_tokenizer(make_cfg(tokenizer='char', tokenizer_path=str(tmp_path / 'empty.txt')).data)
  with pytest.raises(DataError, match='needs a text file'):
    get_tokenizer(make_cfg(tokenizer='char', tokenizer_path=str(tmp_path)).data)
  (tmp_path / 'latin1.txt').write_bytes(b'caf\xe9')
  with pytest.raises(DataError, match='not UTF-8 text'):
    get_tokenizer(make_cfg(tokenizer='char', tokenizer_path=str(tmp_path / 'latin1.txt')).data)
