"""Llama 3 8B (Meta, 2024, "The Llama 3 Herd of Models"; Meta-Llama-3-8B config.json).

Also the Llama 3 family recipe that llama_1b.py and llama_70b.py start from.
Target: `--target=h100-80g --devices=8` (one 8-GPU host; more hosts add data parallelism).
"""

from jaxlm.configs import base


def get_config():
  c = base.get_config().lock()  # locked: a mistyped key below raises
  c.name = 'llama_8b'

  # Llama 3: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.
  m = c.model
  m.vocab_size = 128256
  m.d_model = 4096
  m.n_layers = 32
  m.n_heads = 32
  m.n_kv_heads = 8
  m.mlp_dim = 14336
  m.max_seq_len = 8192
  m.norm = 'rmsnorm'  # eps 1e-5 as in base
  m.activation = 'swiglu'
  m.position = 'rope'
  m.rope_theta = 500000.0
  m.use_bias = False
  m.tie_embeddings = False
  m.dtype = 'bfloat16'  # bf16 compute, fp32 params (param_dtype stays base's float32)
  m.remat = 'full'
  # Runs everywhere with O(len * chunk) memory; prefer 'cudnn' on GPU, 'splash' on TPU.
  m.attention = 'chunked'

  # Pre-tokenized Llama 3 ids; pass --config.data.path and
  # --config.data.tokenizer_path (Llama 3's tokenizer.json) on the command line.
  d = c.data
  d.source = 'arrayrecord'
  d.tokenizer = 'hf'
  d.seq_len = 8192
  d.add_bos = True  # <|begin_of_text|> starts every document

  # 4M tokens per step (512 x 8192); 38000 steps ~ 160B tokens, 20 tokens per parameter.
  t = c.train
  t.batch_size = 512
  t.steps = 38000
  # 4 micro-batches of 128 sequences: 16 x 8192 tokens per GPU on one 8-GPU host, the
  # fewest micro-batches that fit 90% of an H100's 80 GB by the H100's own compiler:
  # 71.65 of the 71.68 GiB usable (XLA:GPU, jax-cuda12-pjrt 0.10.2; `jaxlm plan
  # --config=llama_8b --target=h100-80g --config.train.grad_accum=1`, 2026-12-04).
  # 2 micro-batches: 123.07 GiB; 8: 49.08 GiB (the choice for more headroom).
  t.grad_accum = 4

  # Llama 2 paper recipe (Llama 3's is unpublished below 405B): AdamW b2 0.95,
  # eps 1e-5, wd 0.1, clip 1.0, 2000 warmup steps, cosine to 10% of peak.
  o = c.optim
  o.lr = 3e-4
  o.eps = 1e-5
  o.warmup_steps = 2000

  c.eval.every = 1000
  c.checkpoint.every = 1000

  # Sized for hosts of 8 x H100 80GB: FSDP over a host's 8 GPUs, data parallel
  # across hosts (`jaxlm plan --config=llama_8b --target=h100-80g` checks it).
  c.mesh.data = -1
  c.mesh.fsdp = 8
  return c
