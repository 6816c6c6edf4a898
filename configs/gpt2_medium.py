"""GPT-2 medium, 350M (Radford et al. 2019); lr from GPT-3's 350M row (Brown et al. 2020)."""

import pathlib
import runpy

# base.py is loaded by file path, not `from configs import base`: ml_collections
# config_flags execs this file by path, and the repo root is not on sys.path
# when `jaxlm` runs from another directory.
_base = runpy.run_path(str(pathlib.Path(__file__).with_name('base.py')))


def get_config():
  c = _base['get_config']().lock()  # locked: a mistyped key below raises
  c.name = 'gpt2_medium'

  # GPT-2: learned positions, LayerNorm, GELU, biases, tied embeddings (all base defaults).
  m = c.model
  m.vocab_size = 50304  # GPT-2's 50257 BPE ids padded to a multiple of 128
  m.d_model = 1024
  m.n_layers = 24
  m.n_heads = 16
  m.n_kv_heads = 16
  m.mlp_dim = 4096
  m.max_seq_len = 1024
  m.dtype = 'bfloat16'  # bf16 compute, fp32 params (param_dtype stays base's float32)
  m.remat = 'full'

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

  o = c.optim
  o.lr = 3e-4
  o.warmup_steps = 715

  c.eval.every = 250
  c.checkpoint.every = 1000

  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
