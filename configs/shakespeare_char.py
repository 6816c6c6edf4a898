"""nanoGPT's shakespeare_char CPU recipe (karpathy/nanoGPT README): val loss ~1.88."""

import pathlib
import runpy

# base.py is loaded by file path, not `from configs import base`: ml_collections
# config_flags execs this file by path, and the repo root is not on sys.path
# when `jaxlm` runs from another directory.
_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']().lock()  # locked: a mistyped key below raises
  c.name = 'shakespeare_char'

  # GPT-2 style as in base; nanoGPT's train.py defaults to bias=False.
  m = c.model
  m.n_layers = 4
  m.max_seq_len = 64
  m.use_bias = False

  # Bytes are characters for this ASCII text (nanoGPT's 65-char vocab fits in
  # the 258-id byte tokenizer; base's vocab_size 320 pads it to a multiple of 64).
  d = c.data
  d.path = '../shared/data/tinyshakespeare.txt'
  d.seq_len = 64
  d.add_eos = False  # one document; nanoGPT adds no separator

  t = c.train
  t.steps = 2000
  t.batch_size = 12

  o = c.optim
  o.lr = 1e-3  # cosine to 1e-4 (base min_lr_ratio 0.1) over all 2000 steps
  o.b2 = 0.99
  o.decay_exclude = 'norm,bias'  # nanoGPT decays every 2-D tensor, embeddings included

  e = c.eval
  e.every = 250
  e.batches = 20
  return c
