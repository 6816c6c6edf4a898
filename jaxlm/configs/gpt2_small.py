"""GPT-2 small, 124M (Radford et al. 2019); recipe of Karpathy's llm.c GPT-2 reproduction.

Target: `--target=h100-80g --devices=8` (one 8-GPU host).
"""

from jaxlm.configs import base


def get_config():
  c = base.get_config().lock()  # locked: a mistyped key below raises
  c.name = 'gpt2_small'

  # GPT-2: learned positions, LayerNorm, GELU, biases, tied embeddings (all base defaults).
  m = c.model
  m.vocab_size = 50304  # GPT-2's 50257 BPE ids padded to a multiple of 128
  m.d_model = 768
  m.n_layers = 12
  m.n_heads = 12
  m.n_kv_heads = 12
  m.mlp_dim = 3072
  m.max_seq_len = 1024
  m.dtype = 'bfloat16'  # bf16 compute, fp32 params (param_dtype stays base's float32)
  # No remat, 2 micro-batches (32 x 1024 tokens per GPU): 69.38 GiB per device on 8 x H100
  # by the H100's compiler (XLA:GPU, jax-cuda12-pjrt 0.10.2; `jaxlm plan --config=gpt2_small
  # --target=h100-80g --config.model.remat=none`, 2026-12-04), so no forward is recomputed;
  # remat 'full' with no accumulation took 10.98 GiB.
  m.remat = 'none'

  # Pre-tokenized GPT-2 BPE ids; pass --config.data.path and
  # --config.data.tokenizer_path (GPT-2's tokenizer.json) on the command line.
  d = c.data
  d.source = 'arrayrecord'
  d.tokenizer = 'hf'
  d.seq_len = 1024

  # ~0.5M tokens per step; 19073 steps = 10B tokens (llm.c's GPT-2 reproduction).
  t = c.train
  t.batch_size = 512
  t.steps = 19073
  t.grad_accum = 2

  o = c.optim
  o.lr = 6e-4
  o.warmup_steps = 715

  c.eval.every = 250
  c.checkpoint.every = 1000

  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
