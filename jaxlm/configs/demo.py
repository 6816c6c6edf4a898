"""`make demo`: a small Llama-style byte model trained on this Python's stdlib in minutes on CPU.

Target: `--devices=1` (one CPU).
"""

from jaxlm.configs import base


def get_config():
  c = base.get_config().lock()  # locked: a mistyped key below raises
  c.name = 'demo'

  # Llama-style: RoPE, RMSNorm, SwiGLU, no biases. Tied embeddings suit the tiny byte vocab.
  m = c.model
  m.n_layers = 4
  m.mlp_dim = 384  # SwiGLU hidden ~ 8/3 * d_model, rounded up to a multiple of 128
  m.norm = 'rmsnorm'
  m.activation = 'swiglu'
  m.position = 'rope'
  m.use_bias = False

  # Train on 256-token windows so `make demo`'s 200-token samples stay inside
  # the positions RoPE saw in training (model.max_seq_len stays base's 256).
  d = c.data
  d.source = 'pystdlib'
  d.seq_len = 256

  # Measured on 2 idle CPU cores: `make demo` took 3 min 7 s in all, 500 steps in 2 min 58 s
  # (~0.36 s/step; ~0.7 when the cores are shared); eval loss reaches ~1.58: indented,
  # docstring-ed, `self.`-laden Python.
  t = c.train
  t.steps = 500
  t.batch_size = 8
  t.log_every = 50

  o = c.optim
  o.lr = 2e-3
  o.warmup_steps = 50
  o.b2 = 0.99  # small batches: a longer second-moment average is steadier (as nanoGPT's char models)

  e = c.eval
  e.batches = 4
  e.sample_every = 200
  e.sample_prompts = 'def |import |class '

  c.checkpoint.every = 200
  return c
