"""GPT-2 medium, 350M (Radford et al. 2019); lr from GPT-3's 350M row (Brown et al. 2020).

Same family and recipe as gpt2_small.py; only the size and learning rate differ.
Target: `--target=h100-80g --devices=8` (one 8-GPU host).
"""

from jaxlm.configs import gpt2_small


def get_config():
  c = gpt2_small.get_config()
  c.name = 'gpt2_medium'

  m = c.model
  m.d_model = 1024
  m.n_layers = 24
  m.n_heads = 16
  m.n_kv_heads = 16
  m.mlp_dim = 4096

  c.optim.lr = 3e-4
  # Twice gpt2_small's layers at 4/3 its width: remat full and no accumulation instead of
  # gpt2_small's no remat x 2 micro-batches: 16.66 GiB per device on 8 x H100 (XLA:GPU,
  # jax-cuda12-pjrt 0.10.2; `jaxlm plan --config=gpt2_medium --target=h100-80g`, 2026-12-04).
  m.remat = 'full'
  c.train.grad_accum = 1
  return c
