"""Llama 3.1 405B (Meta, 2024, "The Llama 3 Herd of Models"; Meta-Llama-3.1-405B config.json).

Llama 3 family recipe from llama_8b.py; only what differs is set here. The first
shipped recipe that needs a pipeline: its 126 layers are split into 2 stages.
Target: `--target=v5p-512 --slices=2` (2 slices of 256 TPU v5p chips, joined over DCN).
"""

from jaxlm.configs import llama_8b


def get_config():
  c = llama_8b.get_config()
  c.name = 'llama_405b'

  m = c.model
  m.d_model = 16384
  m.n_layers = 126
  m.n_heads = 128
  m.n_kv_heads = 8
  m.mlp_dim = 53248
  # Llama 3.1: RoPE with long-context frequency scaling (config.json rope_scaling).
  m.rope_scaling = 'llama3'
  m.max_seq_len = 131072
  # Circular pipeline: each stage holds 3 groups of 21 layers; with 2 micro-batches
  # in flight the bubble is (2 - 1) / (2 * 3 + 2 - 1) = 14%. The TPU compiler's cost: the
  # strided view of the layer stack crosses DCN, 949 GiB per chip per step in all, where
  # repeats=1 sends 87 GiB (bubble 33%) and no pipeline 600 GiB (bench/RESULTS.md, issue 30).
  m.pipeline_microbatches = 2
  m.pipeline_repeats = 3

  # 16M tokens per step (2048 x 8192), as Meta's main pretraining stage.
  c.train.batch_size = 2048
  c.train.grad_accum = 64  # 32 sequences per pipelined pass, 16 per micro-batch
  c.train.steps = 950000  # ~15.6T tokens
  # Sized for TPU v5p multislice: 2 slices of 256 chips (v5p-512 each, 95 GiB per chip)
  # joined over DCN. The pipeline crosses DCN (one micro-batch of activations per
  # iteration instead of every layer's FSDP all-gather); inside a slice FSDP over 16 x
  # tensor 4 x sequence 4, with parameters sharded over fsdp and sequence (ZeRO-3 over
  # 64 chips). `jaxlm plan --config=llama_405b --target=v5p-512 --slices=2` with the TPU
  # compiler (libtpu 0.0.42.1): 7.48 + 53.14 = 60.62 GiB per chip, fits (85.50 usable);
  # XLA:CPU's stand-in said 54.74. README "Pipeline parallelism" has its traffic.
  c.mesh.data = 1
  c.mesh.fsdp = 16
  c.mesh.tensor = 4
  c.mesh.sequence = 4
  c.mesh.dcn_pipeline = 2
  c.mesh.rules = 'embed=fsdp,sequence'
  c.optim.lr = 8e-5
  c.optim.warmup_steps = 8000
  c.optim.mu_dtype = 'bfloat16'  # halves Adam's first-moment memory
  return c
