"""Llama 3 70B (Meta, 2024, "The Llama 3 Herd of Models"; Meta-Llama-3-70B config.json).

Llama 3 family recipe from llama_8b.py; only what differs is set here.
Target: `--target=v5p-512` (256 TPU v5p chips, one slice).
"""

from jaxlm.configs import llama_8b


def get_config():
  c = llama_8b.get_config()
  c.name = 'llama_70b'

  m = c.model
  m.d_model = 8192
  m.n_layers = 80
  m.n_heads = 64
  m.mlp_dim = 28672

  # 4M tokens per step (512 x 8192); 335000 steps ~ 1.4T tokens, 20 tokens per parameter.
  c.train.steps = 335000
  # Sized for 256 TPU v5p chips (95 GiB each): FSDP over all 256, two 8192-token
  # sequences per chip, no accumulation: 38.81 GiB per chip by the TPU's own compiler
  # (libtpu 0.0.42.1; `jaxlm plan --config=llama_70b --target=v5p-512`, 2026-12-04;
  # XLA:CPU's stand-in said 64.40). The headroom is for lighter remat or longer sequences.
  c.train.grad_accum = 1
  c.mesh.fsdp = 256
  c.optim.lr = 1.5e-4
  c.optim.mu_dtype = 'bfloat16'  # halves Adam's first-moment memory
  return c
