"""The decoder-only Transformer. GPT-2 and Llama are settings of one model.

GPT-2: learned positions, LayerNorm, GELU, biases, tied embeddings.
Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied head.
Mixtral: Llama with a Mixture-of-Experts MLP (jaxlm.model.moe) in every
``moe_every``-th block.
"""

import jax
import ml_collections
import jax.numpy as jnp
from flax import linen as nn

from jaxlm.core.sharding import constrain
from jaxlm.model import head, pipeline
from jaxlm.model.attention import REMAT_NAMES, Attention, MaskInfo
from jaxlm.model.layers import Dense, Mlp, Norm, dtype_of, param_init
from jaxlm.model.moe import MoeMlp

_REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block in backward
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # MaxText's save_dot_with_context_except_mlp: keep attention, recompute the rest.
    'minimal': jax.checkpoint_policies.save_only_these_names(*REMAT_NAMES),
}

ACT = ('act_batch', 'act_length', 'act_embed')


def is_moe_layer(cfg, i: int) -> bool:
  """Whether block i (from 0) has the MoE MLP: every moe_every-th, ending each group."""
  return cfg.moe_experts > 0 and (i + 1) % cfg.moe_every == 0


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""
  cfg: object
  moe: bool = False  # MoE MLP instead of the dense one

  @nn.compact
  def __call__(self, x, aux, cache):
    """x: [batch, length, embed]; aux: (positions, MaskInfo, cache_index) shared by layers."""
    c = self.cfg
    positions, m, cache_index = aux
    norm = lambda name: Norm(c.norm, c.norm_eps, c.use_bias, c.dtype, c.param_dtype, name=name)
    x = constrain(x, ACT)
    h, new_cache = Attention(c, name='attn')(norm('attn_norm')(x), positions, m, cache, cache_index)
    x = x + h
    mlp = MoeMlp(c, name='mlp') if self.moe else Mlp(c, name='mlp')
    x = x + mlp(norm('mlp_norm')(x))
    return constrain(x, ACT), new_cache


class BlockGroup(nn.Module):
  """moe_every consecutive blocks, the last one MoE: the unit scanned when they alternate."""
  cfg: object
  block: type = Block

  @nn.compact
  def __call__(self, x, aux, cache):
    """cache: per-block {'k','v'} stacked on a leading [moe_every] axis (or None)."""
    c = self.cfg
    new = []
    for j in range(c.moe_every):
      lc = None if cache is None else jax.tree.map(lambda a: a[j], cache)
      x, nc = self.block(c, moe=j == c.moe_every - 1, name=f'block_{j}')(x, aux, lc)
      new.append(nc)
    return x, None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new)


class Transformer(nn.Module):
  """tokens [batch, length] -> logits [batch, length, vocab] (fp32).

  ``features`` (the blocks) and ``logits`` (the head) are also callable apart
  (``model.apply(v, ..., method='features')``), so a loss can build the logits a
  chunk at a time instead of all at once.
  """
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
    self.group = c.moe_experts > 0 and c.moe_every > 1 and c.scan_layers
    if c.scan_layers:
      # Sown MoE losses ('intermediates') come out stacked on the layer axis.
      scan = lambda module, length, **kw: nn.scan(
          module, variable_axes={'params': 0, 'intermediates': 0}, split_rngs={'params': True},
          in_axes=(nn.broadcast, 0), length=length,
          metadata_params={nn.PARTITION_NAME: 'layers'})(c, name='layers', **kw)
      if self.group:
        self.layers = scan(BlockGroup, c.n_layers // c.moe_every, block=block)
      else:
        self.layers = scan(block, c.n_layers, moe=c.moe_experts > 0)
    else:
      self.layers = [block(c, moe=is_moe_layer(c, i), name=f'layer_{i}')
                     for i in range(c.n_layers)]
    self.final_norm = Norm(c.norm, c.norm_eps, c.use_bias, c.dtype, c.param_dtype)
    if not c.tie_embeddings:
      self.head = Dense((c.vocab_size,), ('embed',), ('vocab',), name='head', std=c.init_std,
                        dtype=c.dtype, param_dtype=c.param_dtype)

  def __call__(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None):
    """Returns logits [batch, length, vocab] (fp32), or (logits, new_cache) with a cache.

    Arguments as ``features``. Training and eval losses call ``features`` and
    ``logits`` separately, one sequence chunk at a time (jaxlm.model.loss).
    """
    x, new_cache = self.features(tokens, positions, segment_ids, cache, cache_index)
    logits = self.logits(x)
    return logits if cache is None else (logits, new_cache)

  def features(self, tokens, positions=None, segment_ids=None, cache=None, cache_index=None):
    """(final-normed hidden states [batch, length, embed], new cache or None).

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
    if c.scan_layers and cache is None and self._pipelines(b):
      x, new_layer_cache = self._pipelined(x, positions, m), None
    elif self.group:  # [layers, ...] cache <-> [groups, moe_every, ...]
      split = lambda a: a.reshape(a.shape[0] // c.moe_every, c.moe_every, *a.shape[1:])
      grouped = None if layer_cache is None else jax.tree.map(split, layer_cache)
      x, new_layer_cache = self.layers(x, aux, grouped)
      if new_layer_cache is not None:
        new_layer_cache = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), new_layer_cache)
    elif c.scan_layers:
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
    if cache is None:
      return x, None
    return x, {**new_layer_cache, 'segment': kv_segment}

  def _pipelines(self, rows: int) -> bool:
    """Whether the stack runs pipelined: on a mesh with stages, for a batch of ``rows``
    that splits into the micro-batches (others, e.g. a scoring batch, scan the stack as
    one device would: the same result, unpipelined)."""
    stages = _stages()
    return (stages > 1 and not self.is_initializing()
            and rows % pipeline.microbatches(self.cfg, stages) == 0)

  def _pipelined(self, x, positions, m):
    """The scanned stack over pipeline stages (jaxlm.model.pipeline); same params, same result."""
    c = self.cfg
    stages = _stages()
    unit = (BlockGroup(c, parent=None) if self.group
            else Block(c, moe=c.moe_experts > 0, parent=None))
    mutable = ['intermediates'] if c.moe_experts else False

    def unit_fn(p, h, a):
      pos, mask = a
      out = unit.apply({'params': p}, h, (pos, mask, None), None, mutable=mutable)
      (h, _), sown = out if mutable else (out, {})
      return h, sown.get('intermediates', {})
    if c.remat != 'none':
      unit_fn = jax.checkpoint(unit_fn, policy=_REMAT_POLICIES[c.remat], prevent_cse=False)
    x, sown = pipeline.run(unit_fn, self.variables['params']['layers'], x, (positions, m),
                           stages=stages, micro=pipeline.microbatches(c, stages),
                           repeats=c.pipeline_repeats)
    self._sow_moe(sown)
    return x

  def _sow_moe(self, sown):
    """Re-sows the pipeline's per-unit MoE means as the unpipelined stack would have."""
    if isinstance(sown, dict) and 'moe_load' in sown:
      load, prob = sown['moe_load'][0], sown['moe_prob'][0]
      # Balance loss E * sum_e f_e * P_e of the whole batch, from the micro-batch means.
      self.sow('intermediates', 'moe_aux_loss', jnp.sum(load * prob, axis=-1))
      self.sow('intermediates', 'moe_router_z_loss', sown['moe_router_z_loss'][0])
      self.sow('intermediates', 'moe_load', load)
    elif isinstance(sown, dict):
      for v in sown.values():
        self._sow_moe(v)

  def logits(self, x):
    """Hidden states [batch, length, embed] -> fp32 logits [batch, length, vocab]."""
    c = self.cfg
    # The same weights as head.kernel, through the modules that own them.
    logits = self.embed.attend(x) if c.tie_embeddings else self.head(x)
    logits = constrain(logits.astype(jnp.float32), ('act_batch', 'act_length', 'act_vocab'))
    return head.mask_padding(logits, jnp.arange(c.vocab_size), head.vocab_used(c))


def _stages() -> int:
  """Pipeline stages of the active mesh (1 outside one): traced code follows the mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get('pipeline', 1)


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
