"""Tiny GPT-2-style model for tests: trains a few steps on CPU in seconds.

Target: `--devices=8` (fake CPU devices, as in the tests).
"""

from jaxlm.configs import base


def get_config():
  c = base.get_config().lock()  # locked: a mistyped key below raises
  c.name = 'tiny'

  m = c.model
  m.d_model = 32
  m.mlp_dim = 64
  m.max_seq_len = 64

  c.data.seq_len = 32  # data.source stays 'text'; tests set data.path

  t = c.train
  t.batch_size = 8
  t.steps = 20
  t.log_every = 5
  t.progress = False

  c.optim.lr = 3e-3
  c.optim.warmup_steps = 5

  c.eval.every = 10
  c.eval.batches = 2

  c.checkpoint.every = 10
  return c
