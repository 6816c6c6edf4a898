"""`jaxlm tokenizer train`: BPE and SentencePiece on English + Chinese, loadable, lossless."""

import types

import pytest

from _data_cfg import SHAKESPEARE
from jaxlm.cli import main as cli
from jaxlm.data.tokenizer_train import sample
from jaxlm.data.tokenizers import get_tokenizer

MIXED = ['今天天气很好，我们去公园散步吧。', '机器学习是人工智能的一个分支。',
         'The model reads 中文 and English in one line.', '我喜欢读书 and writing code 😀.']
PROBE = '  Hello,  世界！ 😀 mixed\ttext\n  新しい 日本語 ñ, ROMEO: 机器学习'


def zh_en_text(path, n=400):
  """`n` lines mixing Chinese and English sentences (deterministic), as plain text."""
  lines = [' '.join(MIXED[(i + k) % len(MIXED)] for k in range(1 + i % 3)) for i in range(n)]
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path


def _train(capsys, tmp_path, kind, output, vocab=512):
  # Mixed-script text first: --max_bytes takes the corpus from the front.
  corpus = f'{zh_en_text(tmp_path / "mixed.txt")},{SHAKESPEARE}'
  rc = cli.main(['tokenizer', 'train', f'--input={corpus}', f'--kind={kind}',
                 f'--vocab_size={vocab}', '--max_bytes=200000', f'--output={output}'])
  return rc, capsys.readouterr()


@pytest.mark.parametrize('kind,name,file', [('bpe', 'hf', 'tokenizer.json'),
                                            ('sentencepiece', 'sentencepiece', 'tokenizer.model')])
def test_train_load_roundtrip(tmp_path, capsys, kind, name, file):
  rc, out = _train(capsys, tmp_path, kind, tmp_path / 'tok')
  assert rc == 0, out.err
  assert f'-> {tmp_path / "tok" / file}' in out.out
  bpt = float(out.out.split('held-out compression: ')[1].split()[0])
  assert 1.5 < bpt < 6.0, out.out  # better than bytes; a 512 vocab is far from words
  path = str(tmp_path / 'tok' / file)
  tok = get_tokenizer(types.SimpleNamespace(tokenizer=name, tokenizer_path=path))
  assert tok.vocab_size <= 512 and (tok.bos_id, tok.eos_id) == (0, 1)
  assert tok.decode(tok.encode(PROBE)) == PROBE
  # Chinese is learned, not left as raw bytes: fewer tokens than UTF-8 bytes.
  assert len(tok.encode(MIXED[0])) < len(MIXED[0].encode('utf-8')) / 2


def test_sample_holds_out_the_tail_of_one_document(tmp_path):
  (tmp_path / 'one.txt').write_text('abcdefghij' * 100)
  train, held = sample(str(tmp_path / 'one.txt'), 'text', 'text', 'file', 600, 0.1)
  assert ''.join(train + held) == ('abcdefghij' * 100)[:600]
  assert [len(t) for t in train] == [540] and [len(h) for h in held] == [60]


def test_errors(tmp_path, capsys):
  assert cli.main(['tokenizer', f'--input={SHAKESPEARE}', '--output=x']) == 2
  assert 'usage: jaxlm tokenizer train' in capsys.readouterr().err
  rc, out = _train(capsys, tmp_path, 'bpe', tmp_path / 'tok', vocab=100)
  assert rc == 2 and '--vocab_size 100 is too small' in out.err
  assert cli.main(['tokenizer', 'train', f'--input={tmp_path}/nope*', '--output=x']) == 2
  assert 'matched no files' in capsys.readouterr().err
