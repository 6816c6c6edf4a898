"""An exported HF directory is complete: transformers' Auto classes load it, its tokenizer
gives jaxlm's ids, and batched padded generation equals jaxlm's greedy output."""

import json
import stat

import numpy as np
import pytest

from jaxlm.cli import main as cli
from jaxlm.data import tokenizer_train
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.engine import build as engine
from jaxlm.run.loop import Trainer

PROMPTS = ['ROMEO:\nWhat is', 'First Citizen:\nBefore we proceed any further, hear']


@pytest.mark.parametrize('kind', ['byte', 'char', 'hf'])
def test_export_loads_with_auto_classes_and_generates_like_jaxlm(kind, tiny_cfg, tmp_path):
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  cfg = tiny_cfg
  cfg.data.tokenizer = kind
  cfg.data.add_eos = kind != 'char'  # no EOS in a character alphabet
  if kind == 'hf':
    text = open(cfg.data.path, encoding='utf-8').read()
    cfg.data.tokenizer_path = tokenizer_train.train([text], 'bpe', 300, tmp_path / 'tok')
  cfg.train.steps, cfg.checkpoint.async_save, cfg.eval.every = 6, False, 0
  Trainer(cfg, str(tmp_path / 'w')).run()
  out = tmp_path / 'hf'
  assert cli.main(['convert', f'--workdir={tmp_path / "w"}', f'--to_hf={out}']) == 0

  for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json',
               'special_tokens_map.json', 'generation_config.json'):
    assert (out / name).stat().st_mode & stat.S_IROTH, name  # world-readable
  config = json.loads((out / 'config.json').read_text())
  tok_cfg = json.loads((out / 'tokenizer_config.json').read_text())

  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  jtok = get_tokenizer(cfg.data)
  for t in ('bos', 'eos', 'pad'):
    i = getattr(tok, f'{t}_token_id')
    assert i is None or i < config['vocab_size'], (t, i)
  if kind == 'char':  # the alphabet has no specials
    assert tok.eos_token is None and tok.pad_token is None
  else:
    assert tok.eos_token_id == jtok.eos_id and tok.pad_token_id == tok.eos_token_id
    assert tok_cfg['padding_side'] == 'left'

  sample = 'Wherefore art thou, Romeo?\nNay, my lord!'
  if kind != 'char':
    sample += ' -- 3 times'
  if kind == 'byte':
    sample += ' héllo wörld ✓ 日本'
  assert tok.encode(sample, add_special_tokens=False) == jtok.encode(sample).tolist()
  assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample

  want = engine.generate_text(str(tmp_path / 'w'), PROMPTS, max_new_tokens=10, temperature=0.0)
  if kind == 'char':  # pad with any id: the attention mask hides it
    ids = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    n = max(map(len, ids))
    enc = {'input_ids': torch.tensor([[0] * (n - len(i)) + i for i in ids]),
           'attention_mask': torch.tensor([[0] * (n - len(i)) + [1] * len(i) for i in ids])}
    kw = {'pad_token_id': 0}
  else:
    enc, kw = tok(PROMPTS, return_tensors='pt', padding=True), {}
  assert int(enc['attention_mask'].sum()) < enc['attention_mask'].numel()  # padding happened
  with torch.no_grad():
    gen = model.generate(**enc, max_new_tokens=10, do_sample=False, **kw)
  got = tok.batch_decode(gen[:, enc['input_ids'].shape[1]:], skip_special_tokens=True)
  assert got == want, (got, want)
  assert np.all(gen.numpy() < config['vocab_size'])
