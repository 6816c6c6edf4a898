"""Llama 3.2 1B (Meta, 2024; meta-llama/Llama-3.2-1B config.json), 1.24B params.

Llama 3 family recipe from llama_8b.py; only what differs is set here.
Target: `--target=h100-80g --devices=8` (one 8-GPU host).
"""

from jaxlm.configs import llama_8b


def get_config():
  c = llama_8b.get_config()
  c.name = 'llama_1b'

  m = c.model
  m.d_model = 2048
  m.n_layers = 16
  m.mlp_dim = 8192
  m.tie_embeddings = True  # Llama 3.2 1B ties its output head to the embedding

  c.data.seq_len = 2048
  # 1M tokens per step (512 x 2048); 24000 steps ~ 25B tokens, 20 tokens per parameter.
  c.train.steps = 24000
  # No accumulation: 64 x 2048 tokens per GPU on an 8 x H100-80GB host take 43.89 GiB per
  # device by the H100's compiler (XLA:GPU, jax-cuda12-pjrt 0.10.2; `jaxlm plan
  # --config=llama_1b --target=h100-80g --config.train.grad_accum=1`, 2026-12-04).
  c.train.grad_accum = 1
  return c
