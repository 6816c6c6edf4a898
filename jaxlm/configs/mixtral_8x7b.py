"""Mixtral 8x7B (Mistral AI, 2024, "Mixtral of Experts"; Mixtral-8x7B-v0.1 config.json).

46.7B parameters, 12.9B active per token: Mistral 7B's attention and width with
every MLP replaced by 8 SwiGLU experts, 2 per token (renormalized softmax
router, no shared expert). `jaxlm plan --config=mixtral_8x7b` prints both.
Target: `--target=h100-80g --devices=64` (8 hosts of 8 GPUs).
"""

from jaxlm.configs import llama_8b


def get_config():
  c = llama_8b.get_config()  # Llama recipe: RoPE, RMSNorm, SwiGLU, GQA, no biases, untied
  c.name = 'mixtral_8x7b'

  m = c.model
  m.vocab_size = 32000
  m.max_seq_len = 32768
  m.rope_theta = 1e6
  m.moe_experts = 8
  m.moe_top_k = 2  # expert width = mlp_dim 14336, as llama_8b's MLP
  # Mixtral's router_aux_loss_coef 0.02 on Hugging Face's loss, which is top_k x ours.
  m.moe_aux_loss_weight = 0.04
  m.moe_z_loss_weight = 0.001  # ST-MoE's value; Mixtral publishes none

  # Pre-tokenized ids; pass --config.data.path and --config.data.tokenizer_path
  # (Mixtral's tokenizer.json) on the command line.
  c.data.seq_len = 4096

  # Training recipe unpublished: llama_8b's AdamW/cosine recipe, 2M tokens per step.
  # 2 micro-batches (4 x 4096 tokens per GPU) on 64 H100s: 57.64 GiB per device by the
  # H100's compiler (XLA:GPU, jax-cuda12-pjrt 0.10.2; `jaxlm plan --config=mixtral_8x7b
  # --target=h100-80g --devices=64 --config.train.grad_accum=2`, 2026-12-04); 1: 88.10 GiB,
  # 4: 38.29 GiB.
  # Dropless exchange buffers are sized for the worst case (768 GiB of all-to-all per step).
  c.train.grad_accum = 2
  # Experts split 8 ways (each expert shard holds one expert), FSDP over the rest
  # (llama_8b's data=-1 reset: one axis takes the rest).
  c.mesh.expert = 8
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
