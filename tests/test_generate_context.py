"""jaxlm.engine.generate past the context: every asked-for token comes, each from the most recent
``max_seq_len`` tokens (checked against a full forward pass on the cropped window)."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from conftest import load_config
from jaxlm.engine.generate import generate
from jaxlm.model.transformer import build_model

CONTEXT = 12
VARIANTS = {
    'learned': {},
    'rope': dict(position='rope', norm='rmsnorm', activation='swiglu', use_bias=False,
                 tie_embeddings=False, n_kv_heads=2),
}


def _model(variant):
  cfg = load_config('tiny')
  cfg.model.init_std = 0.3  # peaked logits: no near-ties for float noise to flip
  cfg.model.max_seq_len = CONTEXT
  for k, v in VARIANTS[variant].items():
    cfg.model[k] = v
  model = build_model(cfg.model)
  return model, nn.unbox(model.init(jax.random.key(2), np.zeros((1, 8), np.int32))['params'])


def _cropped_greedy(model, params, prompt, n):
  """nanoGPT's loop: each token is the argmax of a full forward pass over the last
  CONTEXT tokens, positions from 0 (no cache)."""
  forward = jax.jit(lambda p, t: model.apply({'params': p}, t))
  seq = list(prompt)
  for _ in range(n):
    window = seq[-CONTEXT:]
    # Right-padded to one width (one compile): causal attention keeps the zeros after the
    # window from changing its logits.
    ids = np.zeros((1, CONTEXT), np.int32)
    ids[0, :len(window)] = window
    seq.append(int(np.argmax(forward(params, ids)[0, len(window) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_generation_continues_on_the_cropped_window(variant):
  """Batched prompts of lengths 2, 7 and 20 (longer than the context): 30 new tokens each,
  far past the context, equal to recomputing every token on its cropped window."""
  model, params = _model(variant)
  prompts = [[5, 9], [1, 2, 3, 4, 5, 6, 7], list(range(30, 50))]
  n = 30
  got = generate(model, params, prompts, max_new_tokens=n, temperature=0.0)
  assert [len(g) for g in got] == [n, n, n]
  for prompt, g in zip(prompts, got):
    assert g == _cropped_greedy(model, params, prompt, n)


def test_stop_token_past_the_context_ends_only_its_row():
  model, params = _model('learned')
  prompts = [[5, 9], [1, 2, 3, 4, 5, 6, 7]]
  free = generate(model, params, prompts, max_new_tokens=20, temperature=0.0)
  stop = free[0][15]  # a token the first row makes only after the cache is full
  first = free[0].index(stop)
  got = generate(model, params, prompts, max_new_tokens=20, temperature=0.0, stop_ids=(stop,))
  assert got[0] == free[0][:first]
  want = free[1][:free[1].index(stop)] if stop in free[1] else free[1]
  assert got[1] == want
