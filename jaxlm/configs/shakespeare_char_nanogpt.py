"""nanoGPT's documented CPU shakespeare_char run, as a jaxlm config: the same model and recipe.

GPT-2 blocks (learned positions, LayerNorm, GELU MLP of 4 x 128, no biases,
tied embeddings), 4 layers, 4 heads, 128 dims, context 64, batch 12, 2000
iterations, AdamW lr 1e-3 (100 warmup steps, cosine to 1e-4 at step 2000),
betas (0.9, 0.99), weight decay 0.1 on matrices and embeddings, clip 1.0,
dropout 0; eval every 250 iterations on 20 batches of 12. The vocabulary is
nanoGPT's too: the 65 distinct characters of the training text, sorted
(data.tokenizer 'char'), so embedding and head have 65 rows and the model has
nanoGPT's parameter count. It exists for side-by-side runs with the real
nanoGPT (bench/nanogpt_side_by_side.py).
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
  m.vocab_size = 65  # len(sorted(set(text))) of tinyshakespeare, as nanoGPT's meta.pkl

  c.data.tokenizer = 'char'  # alphabet from data.path

  c.train.steps = 2000
  c.train.batch_size = 12
  c.train.log_every = 250

  o = c.optim
  o.lr = 1e-3  # cosine to 1e-4 (base min_lr_ratio 0.1)
  o.warmup_steps = 100

  c.eval.every = 250
  return c
