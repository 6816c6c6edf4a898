"""Tiny Mixtral-style MoE for tests and the MoE demo path: 8 experts, top 2, on CPU in seconds.

Same active size as tiny.py's MLP: each token runs 2 experts of width 32, i.e.
64 SwiGLU columns, as a dense SwiGLU MLP with mlp_dim 64 (bench/RESULTS.md
compares the two on tinyshakespeare). 8 experts so that mesh.expert=8 works.
Target: `--devices=8` (fake CPU devices, as in the tests).
"""

from jaxlm.configs import tiny


def get_config():
  c = tiny.get_config()  # locked: a mistyped key below raises
  c.name = 'tiny_moe'

  m = c.model
  m.position, m.norm, m.activation = 'rope', 'rmsnorm', 'swiglu'
  m.use_bias = False
  m.tie_embeddings = False
  m.n_kv_heads = 2  # grouped-query attention, as Mixtral
  m.moe_experts = 8
  m.moe_top_k = 2
  m.moe_mlp_dim = 32
  return c
