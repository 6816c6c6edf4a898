"""Batched sampling with a KV cache, compiled once per (batch, lengths) shape.

Prompts of different lengths are left-padded into one batch; padding has
segment id 0 so no real token attends to it. Temperature 0 is greedy.

The model sees at most ``context`` tokens (``model.max_seq_len``): a longer
prompt keeps its last ``context`` tokens, and once prompt and output fill the
cache, each further token is computed from the most recent ``context`` tokens
re-run from position 0 (a fresh prefill per token, as nanoGPT crops to
``block_size``), so ``max_new_tokens`` are always produced unless a stop token
ends a row. Learned position tables and RoPE both see positions they were
trained on.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.core.errors import ConfigError
from jaxlm.model.transformer import Transformer, init_cache


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  """ConfigError for sampling options outside their meaning (before a model is loaded)."""
  if not temperature >= 0:  # also NaN
    raise ConfigError(f'--temperature={temperature} must be >= 0 (0 = greedy)')
  if int(top_k) != top_k or top_k < 0:
    raise ConfigError(f'--top_k={top_k} must be an integer >= 0 (0 = off)')
  if not 0 < top_p <= 1:
    raise ConfigError(f'--top_p={top_p} must be in (0, 1] (1 = off)')


def _filter_logits(logits, top_k: int, top_p: float):
  """Masks logits outside the top-k set and outside the top-p nucleus. logits [batch, vocab]."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if 0.0 < top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample_token(rng, logits, temperature, top_k: int, top_p: float):
  """One token per row of ``logits`` [batch, vocab]."""
  greedy = jnp.argmax(logits, axis=-1)
  scaled = _filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
  sampled = jax.random.categorical(rng, scaled, axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'top_k', 'top_p'))
def _decode(model, params, tokens, segment, rng, temperature, stop_ids, *, max_new_tokens,
            top_k, top_p):
  b, p = tokens.shape
  positions = jnp.maximum(jnp.cumsum(segment, axis=1) - 1, 0).astype(jnp.int32)
  cache = init_cache(model.cfg, b, p + max_new_tokens)
  logits, cache = model.apply({'params': params}, tokens, positions, segment, cache=cache,
                              cache_index=0)
  last_logits, last_pos = logits[:, -1], positions[:, -1]
  out = jnp.zeros((b, max_new_tokens), jnp.int32)
  done = jnp.zeros((b,), bool)

  def body(i, carry):
    out, cache, last_logits, last_pos, done, rng = carry
    rng, sub = jax.random.split(rng)
    tok = sample_token(sub, last_logits, temperature, top_k, top_p)
    tok = jnp.where(done, 0, tok)
    out = out.at[:, i].set(tok)
    done = done | jnp.isin(tok, stop_ids)
    pos = last_pos + 1
    logits, cache = model.apply({'params': params}, tok[:, None], pos[:, None],
                                jnp.ones((b, 1), jnp.int32), cache=cache, cache_index=p + i)
    return out, cache, logits[:, -1], pos, done, rng

  out, *_ , done, _ = jax.lax.fori_loop(
      0, max_new_tokens, body, (out, cache, last_logits, last_pos, done, rng))
  return out


def left_pad(prompts: list[list[int]], width: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, segment_ids) [batch, width or max_prompt_len], left-padded with segment 0."""
  width = width or max(1, max(len(p) for p in prompts))
  tokens = np.zeros((len(prompts), width), np.int32)
  segment = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    if p:
      tokens[i, width - len(p):] = p
      segment[i, width - len(p):] = 1
  return tokens, segment


@functools.partial(jax.jit, static_argnames=('model', 'top_k', 'top_p'))
def _next_token(model, params, tokens, segment, rng, temperature, *, top_k, top_p):
  """One token per row from a full forward pass over ``tokens`` [batch, context]."""
  positions = jnp.maximum(jnp.cumsum(segment, axis=1) - 1, 0).astype(jnp.int32)
  logits = model.apply({'params': params}, tokens, positions, segment)
  return sample_token(rng, logits[:, -1], temperature, top_k, top_p)


def generate(model: Transformer, params, prompts: list[list[int]], max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids: tuple[int, ...] = (), context: int = 0) -> list[list[int]]:
  """Continues each prompt (token ids); returns only the new tokens, cut at a stop token.

  ``context``: the most tokens the model sees at once (0 = ``model.cfg.max_seq_len``);
  see the module docstring for what happens past it. ConfigError for invalid
  sampling options (temperature < 0, top_k < 0, top_p outside (0, 1]).
  """
  check_sampling(temperature, top_k, top_p)
  if max_new_tokens < 0:
    raise ConfigError(f'max_new_tokens={max_new_tokens} must be >= 0')
  context = context or model.cfg.max_seq_len
  rows = [[int(t) for t in p][-context:] for p in prompts]
  new: list[list[int]] = [[] for _ in rows]
  done = [False] * len(rows)
  stops = set(stop_ids)
  key = jax.random.key(seed)
  temp = jnp.float32(temperature)
  tokens, segment = left_pad(rows)
  cached = min(max_new_tokens, context - tokens.shape[1])
  if cached > 0:  # the cache holds prompt + output: one compiled decode loop
    out = _decode(model, params, jnp.asarray(tokens), jnp.asarray(segment), key, temp,
                  jnp.asarray(list(stop_ids) or [-1], jnp.int32), max_new_tokens=cached,
                  top_k=int(top_k), top_p=float(top_p))
    for i, row in enumerate(np.asarray(out).tolist()):
      _extend(new[i], row, stops, done, i)
  for step in range(max(cached, 0), max_new_tokens):  # past the context: crop and re-run
    if all(done):
      break
    tokens, segment = left_pad([(r + n)[-context:] for r, n in zip(rows, new)], width=context)
    tok = _next_token(model, params, jnp.asarray(tokens), jnp.asarray(segment),
                      jax.random.fold_in(key, step), temp, top_k=int(top_k), top_p=float(top_p))
    for i, t in enumerate(np.asarray(tok).tolist()):
      if not done[i]:
        _extend(new[i], [t], stops, done, i)
  return new


def _extend(row: list[int], tokens: list[int], stops: set, done: list[bool], i: int) -> None:
  """Appends ``tokens`` to ``row`` up to (not including) the first stop token."""
  for t in tokens:
    if t in stops:
      done[i] = True
      return
    row.append(t)
