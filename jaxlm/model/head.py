"""The LM head, written once: which weights map hidden states to logits, and which
vocab rows are padding.

Transformer.logits (generation, eval, the unchunked loss) and the chunked
training loss (jaxlm.model.loss.head_losses) both read it, so a change to the
head cannot make the two losses disagree.
"""

import jax.numpy as jnp

# Finite, not -inf: softmax gives 0, and 0 * logit stays 0 (no inf * 0 NaNs).
PAD_LOGIT = -1e30


def kernel(params, cfg):
  """The head's weights [embed, vocab]: the token embedding transposed when tied."""
  return params['embed']['embedding'].T if cfg.tie_embeddings else params['head']['kernel']


def vocab_used(cfg) -> int:
  """Vocab ids from here on are padding (never predicted, sampled or scored); 0 = none."""
  return cfg.vocab_used if 0 < cfg.vocab_used < cfg.vocab_size else 0


def mask_padding(logits, ids, used: int):
  """``logits`` [..., vocab tile] with the padding ids (>= ``used`` > 0) set to PAD_LOGIT."""
  return jnp.where(ids < used, logits, PAD_LOGIT) if used else logits
