"""A workdir owns its tokenizer (jaxlm.data.workdir_tokenizer) and its config.json's paths are
absolute: retraining the original tokenizer file in place, or running from another
directory, changes nothing a later command does."""

import hashlib
import json

from conftest import load_config
from jaxlm.cli import main as cli
from jaxlm.data.tokenizers import get_tokenizer

STEPS = ['--config.train.steps=2', '--config.train.progress=False', '--config.eval.every=0',
         '--config.checkpoint.every=0']


def _err_line(capsys) -> list[str]:
  return [l for l in capsys.readouterr().err.splitlines() if 'jaxlm: error:' in l]


def test_workdir_keeps_its_tokenizer_and_absolute_paths(tmp_path, tiny_cfg, monkeypatch, capsys):
  text = open(tiny_cfg.data.path).read()
  (tmp_path / 'a.txt').write_text(text[:30_000])
  (tmp_path / 'b.txt').write_text(text[30_000:])
  monkeypatch.chdir(tmp_path)
  tok_train = ['tokenizer', 'train', '--kind=bpe', '--vocab_size=300',
               '--output=tok/tokenizer.json']
  assert cli.main(tok_train + ['--input=a.txt']) == 0
  assert cli.main(['train', '--config=tiny', '--workdir=run', '--config.data.path=a.txt',
                   '--config.data.tokenizer=hf', '--config.data.tokenizer_path=tok/tokenizer.json',
                   *STEPS]) == 0
  d = json.loads((tmp_path / 'run' / 'config.json').read_text())['data']
  copy = tmp_path / 'run' / 'tokenizer' / 'tokenizer.json'
  assert d['path'] == str(tmp_path / 'a.txt')
  assert d['tokenizer_path'] == str(copy)
  assert d['tokenizer_sha256'] == hashlib.sha256(copy.read_bytes()).hexdigest()
  assert d['tokenizer_vocab'] == 300
  assert copy.read_bytes() == (tmp_path / 'tok' / 'tokenizer.json').read_bytes()

  generate = ['generate', f'--workdir={tmp_path / "run"}', '--prompt=First', '--max_new_tokens=12',
              '--temperature=0']
  capsys.readouterr()
  assert cli.main(generate) == 0
  before = capsys.readouterr().out

  # Retraining the original in place needs --overwrite; the run is not affected by it.
  assert cli.main(tok_train + ['--input=b.txt']) == 2
  assert 'pass --overwrite' in _err_line(capsys)[0]
  assert cli.main(tok_train + ['--input=b.txt', '--overwrite']) == 0
  assert copy.read_bytes() != (tmp_path / 'tok' / 'tokenizer.json').read_bytes()
  (tmp_path / 'elsewhere').mkdir()
  monkeypatch.chdir(tmp_path / 'elsewhere')  # and from another directory
  capsys.readouterr()
  assert cli.main(generate) == 0
  assert capsys.readouterr().out == before
  assert cli.main(['eval', f'--workdir={tmp_path / "run"}']) == 0
  # Resuming names the retrained file: the run keeps its copy.
  assert cli.main(['train', '--config=tiny', f'--workdir={tmp_path / "run"}',
                   f'--config.data.path={tmp_path / "a.txt"}', '--config.data.tokenizer=hf',
                   f'--config.data.tokenizer_path={tmp_path / "tok" / "tokenizer.json"}',
                   *STEPS]) == 0
  again = json.loads((tmp_path / 'run' / 'config.json').read_text())['data']
  assert again['tokenizer_path'] == str(copy)
  assert again['tokenizer_sha256'] == d['tokenizer_sha256']

  # A changed copy is refused, not used.
  copy.write_text(copy.read_text().replace('"First"', '"Frist"').replace('}', ' }', 1))
  capsys.readouterr()
  assert cli.main(generate) == 2
  assert 'has changed since the run recorded it' in _err_line(capsys)[0]


def test_char_run_keeps_its_alphabet_not_the_text(tmp_path, tiny_cfg):
  from jaxlm.run.loop import Trainer  # noqa: PLC0415
  cfg = load_config('tiny')
  cfg.data.path, cfg.data.tokenizer, cfg.model.vocab_size = tiny_cfg.data.path, 'char', 128
  cfg.data.add_eos = False  # a char alphabet has no EOS
  cfg.train.steps, cfg.eval.every, cfg.checkpoint.every, cfg.train.progress = 1, 0, 0, False
  want = get_tokenizer(cfg.data)
  Trainer(cfg, str(tmp_path / 'run')).run()
  d = json.loads((tmp_path / 'run' / 'config.json').read_text())['data']
  assert d['tokenizer_path'] == str(tmp_path / 'run' / 'tokenizer' / 'alphabet.txt')
  assert d['tokenizer_vocab'] == want.vocab_size
  saved = load_config('tiny').data
  saved.tokenizer, saved.tokenizer_path, saved.tokenizer_sha256 = 'char', d['tokenizer_path'], \
      d['tokenizer_sha256']
  got = get_tokenizer(saved)
  sample = open(tiny_cfg.data.path).read()[:500]
  assert list(got.encode(sample)) == list(want.encode(sample))
