"""nanoGPT's documented CPU shakespeare_char run, as a jaxlm config: the same model and recipe.

GPT-2 blocks (learned positions, LayerNorm, GELU MLP of 4 x 128, no biases,
tied embeddings), 4 layers, 4 heads, 128 dims, context 64, batch 12, 2000
iterations, AdamW lr 1e-3 (100 warmup steps, cosine to 1e-4 at step 2000),
betas (0.9, 0.99), weight decay 0.1 on matrices and embeddings, clip 1.0,
dropout 0; eval every 250 iterations on 20 batches of 12. It exists for
side-by-side runs with the real nanoGPT (bench/nanogpt_side_by_side.py).

The one difference is the vocabulary: jaxlm's byte tokenizer padded to 320
rows, where nanoGPT has the text's 65 characters. nanoGPT's exact vocabulary is
`--config.data.tokenizer=char --config.model.vocab_size=65` (804,096
parameters), but in jaxlm it ends this recipe at a higher val loss: 1.917,
1.897, 1.925 for seeds 0-2 against 1.882, 1.863, 1.886 with the 320 byte rows,
and 1.881 with the 65 characters in 320 rows: the unused rows, not the ids,
make the difference (bench/RESULTS.md, issue 19; why is not established).
Per token the 320 rows make jaxlm compute ~4% more than nanoGPT, so its
speed ratio is, if anything, understated.
Target: `--devices=1` (one CPU).
"""

from jaxlm.configs import shakespeare_char


def get_config():
  c = shakespeare_char.get_config()
  c.name = 'shakespeare_char_nanogpt'

  m = c.model
  m.position = 'learned'
  m.norm = 'layernorm'
  m.activation = 'gelu_exact'  # nanoGPT's nn.GELU() is the exact (erf) GELU
  m.mlp_dim = 512

  c.train.steps = 2000
  c.train.batch_size = 12
  c.train.log_every = 250

  o = c.optim
  o.lr = 1e-3  # cosine to 1e-4 (base min_lr_ratio 0.1)
  o.warmup_steps = 100

  c.eval.every = 250
  return c
