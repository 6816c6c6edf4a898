"""Character-level Shakespeare on CPU: val loss <= 1.88 (nanoGPT's CPU target) in few steps.

nanoGPT's CPU recipe (4 layers, 4 heads, 128 dims, context 64, batch 12, lr 1e-3,
2000 iters) reaches ~1.88 after ~1.5M tokens. This Llama-style variant of the
same size (RoPE, RMSNorm, SwiGLU, no biases; ~0.85M params) takes small batches
of 4 windows with a higher lr and a cosine decay over 1800 steps: it gets there
in ~0.38M tokens (more updates per token), while a token costs about the same
on a 2-core CPU at batch 4 as at 16. ``bench/shakespeare.py`` times it;
bench/RESULTS.md has the figures and the batch-size trials.
Target: `--devices=1` (one CPU).
"""

from jaxlm.configs import base


def get_config():
  c = base.get_config().lock()  # locked: a mistyped key below raises
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
  t.steps = 1800
  t.batch_size = 4
  t.log_every = 100

  o = c.optim
  o.lr = 2e-3  # cosine to 2e-4 (base min_lr_ratio 0.1) over all 1800 steps
  o.warmup_steps = 30
  o.b2 = 0.99
  o.decay_exclude = 'norm,bias'  # nanoGPT decays every 2-D tensor, embeddings included

  # nanoGPT's CPU eval: 20 batches x 12 windows x 64 = 15,360 validation tokens.
  e = c.eval
  e.every = 100
  e.batches = 20
  e.batch_size = 12
  return c
