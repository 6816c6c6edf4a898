"""The decoder-only Transformer. GPT-2 and Llama are settings of one model.

GPT-2: learned positions, LayerNorm, GELU, biases, tied embeddings.
Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied head.
"""

import jax
import ml_collections
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.model.attention import Attention, MaskInfo
from jaxlm.model.layers import Dense, Mlp, Norm, dtype_of, param_init
from jaxlm.sharding import constrain

_REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block in backward
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

ACT = ('act_batch', 'act_length', 'act_embed')


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""
  cfg: object

  @nn.compact
  def __call__(self, x, aux, cache):
    """x: [batch, length, embed]; aux: (positions, MaskInfo, cache_index) shared by layers."""
    c = self.cfg
    positions, m, cache_index = aux
    norm = lambda name: Norm(c.norm, c.norm_eps, c.use_bias, c.dtype, c.param_dtype, name=name)
    x = constrain(x, ACT)
    h, new_cache = Attention(c, name='attn')(norm('attn_norm')(x), positions, m, cache, cache_index)
    x = x + h
    x = x + Mlp(c, name='mlp')(norm('mlp_norm')(x))
    return constrain(x, ACT), new_cache


class Transformer(nn.Module):
  """tokens [batch, length] -> logits [batch, length, vocab] (fp32)."""
  cfg: object

  def setup(self):
    c = self.cfg
    self.embed = nn.Embed(c.vocab_size, c.d_model, dtype=dtype_of(c.dtype),
                          param_dtype=dtype_of(c.param_dtype),
                          embedding_init=param_init(c.init_std, ('vocab', 'embed')))
    if c.position == 'learned':
      self.pos_embed = nn.Embed(c.max_seq_len, c.d_model, dtype=dtype_of(c.dtype),
                                param_dtype=dtype_of(c.param_dtype),
                                embedding_init=param_init(0.01, (None, 'embed')))
    block = Block
    if c.remat != 'none':
      block = nn.remat(Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=(nn.broadcast, 0), length=c.n_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'})(c, name='layers')
    else:
      self.layers = [block(c, name=f'layer_{i}') for i in range(c.n_layers)]
    self.final_norm = Norm(c.norm, c.norm_eps, c.use_bias, c.dtype, c.param_dtype)
    if not c.tie_embeddings:
      self.head = Dense((c.vocab_size,), ('embed',), ('vocab',), name='head', std=c.init_std,
                        dtype=c.dtype, param_dtype=c.param_dtype)

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None):
    """Returns logits, or (logits, new_cache) when a cache is given.

    tokens/positions/segment_ids: [batch, length]. segment_ids separate packed
    documents (0 = padding); positions restart at 0 in each document.
    cache: per-layer {'k','v'} stacked on a leading [layers] axis plus
    'segment' [batch, max_len]; new tokens are written at ``cache_index``.
    """
    c = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None:
      m = MaskInfo(segment_ids, segment_ids, q_index, q_index)
      layer_cache, kv_segment = None, None
    else:
      kv_segment = jax.lax.dynamic_update_slice_in_dim(cache['segment'], segment_ids,
                                                       cache_index, axis=1)
      s = kv_segment.shape[1]
      kv_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
      m = MaskInfo(segment_ids, kv_segment, q_index + cache_index, kv_index)
      layer_cache = {'k': cache['k'], 'v': cache['v']}

    x = self.embed(tokens)
    if c.position == 'learned':
      x = x + self.pos_embed(positions)
    aux = (positions, m, cache_index)
    if c.scan_layers:
      x, new_layer_cache = self.layers(x, aux, layer_cache)
    else:
      outs = []
      for i, layer in enumerate(self.layers):
        lc = None if layer_cache is None else jax.tree.map(lambda a: a[i], layer_cache)
        x, nc = layer(x, aux, lc)
        outs.append(nc)
      new_layer_cache = None if layer_cache is None else jax.tree.map(
          lambda *a: jnp.stack(a), *outs)
    x = self.final_norm(x)
    if c.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.head(x)
    logits = constrain(logits.astype(jnp.float32), ('act_batch', 'act_length', 'act_vocab'))
    if cache is None:
      return logits
    return logits, {**new_layer_cache, 'segment': kv_segment}


def init_cache(cfg, batch: int, max_len: int, dtype=None):
  """Zeroed KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
  hd = cfg.head_dim or cfg.d_model // cfg.n_heads
  dt = dtype or dtype_of(cfg.dtype)
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, hd)
  return {'k': jnp.zeros(shape, dt), 'v': jnp.zeros(shape, dt),
          'segment': jnp.zeros((batch, max_len), jnp.int32)}


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def build_model(model_cfg) -> Transformer:
  """The Transformer for a ``model`` config section (frozen, so the module hashes)."""
  return Transformer(ml_collections.FrozenConfigDict(model_cfg))
