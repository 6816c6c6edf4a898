"""Character-level Shakespeare on CPU: val loss <= 1.88 (nanoGPT's CPU target) in few steps.

nanoGPT's CPU recipe (4 layers, 4 heads, 128 dims, context 64, batch 12, lr 1e-3,
2000 iters) reaches 1.88 after ~1.5M tokens. This Llama-style variant of the
same size (RoPE, RMSNorm, SwiGLU, no biases; ~0.85M params) with a higher lr
and a cosine decay over 600 steps of batch 16 gets there in ~0.6M tokens.
``bench/shakespeare.py`` times it; bench/RESULTS.md has the figures.
"""

import pathlib
import runpy

# base.py is loaded by file path, not `from configs import base`: ml_collections
# config_flags execs this file by path, and the repo root is not on sys.path
# when `jaxlm` runs from another directory.
_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']().lock()  # locked: a mistyped key below raises
  c.name = 'shakespeare_char'

  m = c.model
  m.n_layers = 4
  m.max_seq_len = 64
  m.use_bias = False
  m.position = 'rope'
  m.norm = 'rmsnorm'
  m.activation = 'swiglu'
  m.mlp_dim = 352  # SwiGLU: 3 * 128 * 352 ~ the 2 * 128 * 512 of a GELU MLP
  # Unrolled layers run ~6% faster than nn.scan on XLA:CPU at this size (no
  # stacked residual buffers to fill and slice) and compile no slower.
  m.scan_layers = False

  # Bytes are characters for this ASCII text (nanoGPT's 65-char vocab fits in
  # the 258-id byte tokenizer; base's vocab_size 320 pads it to a multiple of 64).
  d = c.data
  d.path = '../shared/data/tinyshakespeare.txt'
  d.seq_len = 64
  d.add_eos = False  # one document; nanoGPT adds no separator

  t = c.train
  t.steps = 600
  t.batch_size = 16
  t.log_every = 50

  o = c.optim
  o.lr = 3e-3  # cosine to 3e-4 (base min_lr_ratio 0.1) over all 600 steps
  o.warmup_steps = 30
  o.b2 = 0.99
  o.decay_exclude = 'norm,bias'  # nanoGPT decays every 2-D tensor, embeddings included

  e = c.eval
  e.every = 50
  e.batches = 20  # 20 x 16 windows of 64 = 20,480 validation tokens
  return c
