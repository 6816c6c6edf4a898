"""Mixture-of-Experts MLP: router, top-k dispatch to SwiGLU experts, aux losses, expert parallelism.

A linear router scores ``moe_experts`` experts per token; each token goes to its
``moe_top_k`` best (softmax probabilities, renormalized over the chosen k as in
Mixtral unless ``moe_renormalize`` is off) and its output is the weighted sum of
those experts' SwiGLU outputs, plus ``moe_shared_experts`` always-on experts.

Two dispatch modes compute the same function (``dense_reference`` is the spec):
  dropless (default): token copies are sorted by expert and run through
    ``jax.lax.ragged_dot`` (a grouped matmul), so no token is dropped and no
    padding is computed;
  capacity (``moe_capacity_factor > 0``): each expert takes at most
    ``ceil(factor * tokens * k / experts)`` copies per token shard into a fixed
    ``[experts, capacity, embed]`` buffer (GShard/Switch); the rest are dropped,
    top-1 choices first.

Expert parallelism: the expert axis of the weights is split over the mesh axes
the logical axis ``expert`` maps to, and tokens, which are split over the same
axes as part of the batch, travel to their experts' shard and back with
``all_to_all`` inside ``shard_map``. Where the batch is not split over those axes
(e.g. a one-sequence generate), every shard runs its own experts on all tokens
and the outputs are summed instead. FSDP-sharded weights are all-gathered per
layer by XLA; tensor-parallel ``mlp`` columns give partial outputs that are summed.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jaxlm.core.sharding import constrain
from jaxlm.model.layers import Mlp, dtype_of, param_init


class Routing(NamedTuple):
  experts: jax.Array  # [tokens, k] int32, chosen expert ids, best first
  weights: jax.Array  # [tokens, k] fp32 combine weights


def route(logits: jax.Array, top_k: int, renormalize: bool = True) -> Routing:
  """Softmax over experts, keep the top k; logits [tokens, experts] fp32."""
  probs = jax.nn.softmax(logits, axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if renormalize:  # Mixtral: softmax over the chosen k only
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(experts.astype(jnp.int32), weights)


def router_losses(logits: jax.Array, experts: jax.Array):
  """(load-balancing loss, router z-loss, load [experts]) for logits [tokens, experts].

  Load balancing (Switch Transformer eq. 4, Mixtral): ``E * sum_e f_e * P_e``
  with f_e the fraction of token copies routed to e and P_e the mean router
  probability of e; it is 1.0 when both are uniform (Hugging Face's Mixtral
  loss is k times this). Router z-loss (ST-MoE): mean of logsumexp(logits)^2,
  which keeps router logits small. ``load`` is E * f_e (1.0 = balanced).
  """
  n_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  counts = jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32), axis=(0, 1))
  frac = counts / experts.size
  balance = n_experts * jnp.sum(frac * jnp.mean(probs, axis=0))
  z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
  return balance, z, n_experts * frac


def combine_matrix(r: Routing, n_experts: int, keep: jax.Array | None = None) -> jax.Array:
  """[tokens, experts] weights: each token's weight per expert, 0 where not chosen (or dropped)."""
  w = r.weights if keep is None else jnp.where(keep, r.weights, 0.0)
  return jnp.sum(jax.nn.one_hot(r.experts, n_experts, dtype=w.dtype) * w[..., None], axis=1)


def swiglu_experts(x, gate, up, down, group_sizes):
  """Grouped SwiGLU. x [rows, embed] sorted by expert; weights [experts, ...].

  Rows past ``sum(group_sizes)`` give zeros.
  """
  h = nn.silu(jax.lax.ragged_dot(x, gate, group_sizes)) * jax.lax.ragged_dot(x, up, group_sizes)
  return jax.lax.ragged_dot(h, down, group_sizes)


def dense_reference(x, combine, gate, up, down):
  """Every expert on every token, masked by the router: the definition the fast paths meet.

  x [tokens, embed]; combine [tokens, experts]; gate/up [experts, embed, mlp];
  down [experts, mlp, embed]. Costs every expert for every token: tests only.
  """
  h = nn.silu(jnp.einsum('td,edf->tef', x, gate)) * jnp.einsum('td,edf->tef', x, up)
  y = jnp.einsum('tef,efd->ted', h, down)
  return jnp.einsum('ted,te->td', y, combine.astype(y.dtype))


def capacity(tokens: int, top_k: int, n_experts: int, factor: float) -> int:
  """Token copies each expert accepts per shard in capacity mode."""
  return max(1, math.ceil(factor * tokens * top_k / n_experts))


def capacity_keep(experts: jax.Array, n_experts: int, cap: int):
  """(keep [tokens, k] bool, slot position within its expert [tokens, k]).

  Top-1 choices of all tokens are served before any top-2 choice, then in
  token order (Switch/GShard priority).
  """
  t, k = experts.shape
  flat = experts.T.reshape(-1)  # choice-major
  onehot = jax.nn.one_hot(flat, n_experts, dtype=jnp.int32)
  pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
  pos = pos.reshape(k, t).T
  return pos < cap, pos


# ---- one shard's work (inside shard_map, or alone without a mesh) ---------------------

def _exchange(x, axes):
  """[shards, rows, ...] -> [shards, rows, ...]: block j goes to shard j, block i comes from i."""
  if not axes:
    return x
  return jax.lax.all_to_all(x, axes, 0, 0, tiled=True)


def _dropless(x, r: Routing, gate, up, down, ep_axes, ep: int):
  """Sorted, ragged_dot dispatch. x [tokens, embed] -> per-copy outputs [tokens, k, embed]."""
  t, k = r.experts.shape
  n_local = gate.shape[0]
  a = t * k
  flat = r.experts.reshape(a)
  order = jnp.argsort(flat, stable=True)
  sorted_e = flat[order]
  xs = x[order // k]  # [copies, embed] grouped by expert
  if ep == 1:
    ys = swiglu_experts(xs, gate, up, down, jnp.bincount(flat, length=n_local))
  else:
    # Copies for shard j are the contiguous run of experts [j*n_local, (j+1)*n_local); each
    # run is sent in a block of ``a`` rows (the most one shard can need), zero-padded.
    dest = sorted_e // n_local
    count = jnp.bincount(dest, length=ep)
    start = jnp.cumsum(count) - count
    row = jnp.arange(a)
    valid = row[None, :] < count[:, None]  # [ep, a]
    idx = jnp.where(valid, start[:, None] + row[None, :], 0)
    send_x = jnp.where(valid[..., None], xs[idx], 0).astype(xs.dtype)
    send_e = jnp.where(valid, sorted_e[idx] % n_local, n_local)  # n_local = padding
    recv_x = _exchange(send_x, ep_axes).reshape(ep * a, -1)
    recv_e = _exchange(send_e, ep_axes).reshape(ep * a)
    order2 = jnp.argsort(recv_e, stable=True)
    ry = swiglu_experts(recv_x[order2], gate, up, down, jnp.bincount(recv_e, length=n_local))
    ry = ry[jnp.argsort(order2)].reshape(ep, a, -1)
    back = _exchange(ry, ep_axes)  # [ep, a, embed]: results for the rows sent to each shard
    ys = jnp.zeros((a, back.shape[-1]), back.dtype).at[idx.reshape(-1)].add(
        jnp.where(valid[..., None], back, 0).reshape(ep * a, -1))
  return ys[jnp.argsort(order)].reshape(t, k, -1)


def _capacity(x, r: Routing, gate, up, down, ep_axes, ep: int, cap: int):
  """Fixed-shape dispatch into [experts, capacity, embed] buffers; over-capacity copies drop."""
  t, k = r.experts.shape
  n_local = gate.shape[0]
  n = n_local * ep
  keep, pos = capacity_keep(r.experts, n, cap)
  slot = jnp.where(keep & (r.experts < n), r.experts * cap + pos, n * cap).reshape(-1)
  src = jnp.repeat(x, k, axis=0)
  buf = jnp.zeros((n * cap, x.shape[-1]), x.dtype).at[slot].set(src, mode='drop')
  buf = _exchange(buf.reshape(ep, n_local * cap, -1), ep_axes)  # [source shard, local slots]
  buf = buf.reshape(ep, n_local, cap, -1).transpose(1, 0, 2, 3).reshape(n_local, ep * cap, -1)
  h = nn.silu(jnp.einsum('ecd,edf->ecf', buf, gate)) * jnp.einsum('ecd,edf->ecf', buf, up)
  y = jnp.einsum('ecf,efd->ecd', h, down)
  y = y.reshape(n_local, ep, cap, -1).transpose(1, 0, 2, 3).reshape(ep, n_local * cap, -1)
  y = _exchange(y, ep_axes).reshape(n * cap, -1)
  ys = y.at[slot].get(mode='fill', fill_value=0)
  return ys.reshape(t, k, -1)


def experts_forward(x, r: Routing, gate, up, down, *, n_experts: int,
                    capacity_factor: float = 0.0, exchange_axes=(), first_expert=None):
  """One shard's MoE output [tokens, embed] for its tokens x [tokens, embed].

  gate/up/down hold ``n_local`` of the ``n_experts`` experts. Either the
  tokens are split over ``exchange_axes`` (whose shards hold consecutive expert
  blocks) and copies travel to their expert's shard and back; or
  ``first_expert`` is given: tokens are replicated over the expert shards,
  only copies routed to experts ``first_expert .. + n_local`` contribute here,
  and the caller sums the shards' outputs.
  """
  n_local = gate.shape[0]
  t, k = r.experts.shape
  ep = n_experts // n_local if exchange_axes else 1
  cap = capacity(t, k, n_experts, capacity_factor) if capacity_factor > 0 else 0
  weights = r.weights
  if first_expert is not None:
    mine = (r.experts >= first_expert) & (r.experts < first_expert + n_local)
    weights = jnp.where(mine, weights, 0.0)
    r = Routing(jnp.where(mine, r.experts - first_expert, n_local), weights)
    # Capacity slots count copies per expert only, so other shards' copies (now the
    # padding id n_local) do not change which local copies are dropped.
  if cap:
    ys = _capacity(x, r, gate, up, down, exchange_axes, ep, cap)
  else:
    ys = _dropless(x, r, gate, up, down, exchange_axes, ep)
  return jnp.einsum('tkd,tk->td', ys, weights.astype(ys.dtype))


# ---- the layer ------------------------------------------------------------------------

def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


class MoeMlp(nn.Module):
  """x [batch, length, embed] -> [batch, length, embed]; sows router losses and expert load."""
  cfg: object

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.cfg
    n, k, f, d = c.moe_experts, c.moe_top_k, c.moe_mlp_dim or c.mlp_dim, x.shape[-1]
    pdt, cdt = dtype_of(c.param_dtype), dtype_of(c.dtype)
    router = self.param('router', param_init(c.init_std, ('embed', None)), (d, n), pdt)
    gate = self.param('gate', param_init(c.init_std, ('expert', 'embed', 'mlp')), (n, d, f), pdt)
    up = self.param('up', param_init(c.init_std, ('expert', 'embed', 'mlp')), (n, d, f), pdt)
    # GPT-2-style 1/sqrt(2 * layers) on the residual-output projection, as the dense MLP.
    down_std = c.init_std / (2 * c.n_layers) ** 0.5
    down = self.param('down', param_init(down_std, ('expert', 'mlp', 'embed')), (n, f, d), pdt)

    b, t = x.shape[:2]
    # The router runs in fp32: bf16 logits flip near-tied top-k choices.
    logits = jnp.einsum('bld,de->ble', x.astype(jnp.float32), router.astype(jnp.float32))
    r = route(logits.reshape(b * t, n), k, c.moe_renormalize)
    balance, z, load = router_losses(logits.reshape(b * t, n), r.experts)
    self.sow('intermediates', 'moe_aux_loss', balance)
    self.sow('intermediates', 'moe_router_z_loss', z)
    self.sow('intermediates', 'moe_load', load)
    # Mean router probabilities [experts]: with moe_load, the pipeline rebuilds the exact
    # whole-batch balance loss from its micro-batches' means (jaxlm.model.pipeline).
    self.sow('intermediates', 'moe_prob', jnp.mean(jax.nn.softmax(logits.reshape(b * t, n), -1), 0))
    r = Routing(r.experts.reshape(b, t, k), r.weights.reshape(b, t, k))
    y = _sharded_experts(x.astype(cdt), r, gate.astype(cdt), up.astype(cdt), down.astype(cdt),
                         c.moe_capacity_factor)
    if c.moe_shared_experts:
      y = y + Mlp(c, mlp_dim=c.moe_shared_experts * f, name='shared')(x)
    return y


def _sharded_experts(x, r: Routing, gate, up, down, capacity_factor: float):
  """experts_forward over the current mesh (shard_map), or directly without one."""
  mesh = jax.sharding.get_abstract_mesh()
  n_experts = gate.shape[0]
  flat = lambda a: a.reshape(-1, a.shape[-1])
  if mesh.empty:
    y = experts_forward(flat(x), Routing(flat(r.experts), flat(r.weights)), gate, up, down,
                        n_experts=n_experts, capacity_factor=capacity_factor)
    return y.reshape(x.shape)

  wspec = nn.logical_to_mesh_axes(('expert', 'embed', 'mlp'))
  ep_axes, mlp_axes = _axes(wspec[0]), _axes(wspec[2])
  xspec = nn.logical_to_mesh_axes(('act_batch', 'act_length', 'act_embed'))
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  batch_axes, length_axes = _axes(xspec[0]), _axes(xspec[1])
  if not set(ep_axes) <= set(batch_axes) or x.shape[0] % size(batch_axes):
    batch_axes = tuple(a for a in batch_axes if a not in ep_axes)  # tokens replicated over ep
    if x.shape[0] % size(batch_axes):
      batch_axes = ()
  if x.shape[1] % size(length_axes):
    length_axes = ()
  token_axes = set(batch_axes) | set(length_axes)
  exchange = bool(ep_axes) and set(ep_axes) <= token_axes
  # Weights enter whole along embed (XLA all-gathers FSDP shards per layer, and
  # reduce-scatters their gradients); 'mlp' columns stay split where the tokens
  # are not, giving partial outputs summed below (Megatron row-parallel).
  summed = tuple(a for a in mlp_axes if a not in token_axes and a not in ep_axes)
  tspec = P(batch_axes or None, length_axes or None, None)

  def shard(x, experts, weights, gate, up, down):
    first = None
    if ep_axes and not exchange:
      first = jax.lax.axis_index(ep_axes) * gate.shape[0]
    total = summed + (ep_axes if ep_axes and not exchange else ())
    if total:
      # x is the same on these shards but each contributes its own share of the input
      # gradient: marking it varying makes autodiff sum the shares (ragged_dot's
      # implicit broadcast does not), the backward twin of the psum below.
      x = jax.lax.pcast(x, total, to='varying')
    y = experts_forward(flat(x), Routing(flat(experts), flat(weights)), gate, up, down,
                        n_experts=n_experts, capacity_factor=capacity_factor,
                        exchange_axes=ep_axes if exchange else (), first_expert=first)
    if total:
      y = jax.lax.psum(y, total)
    return y.reshape(x.shape)

  wspec_in = P(ep_axes or None, None, summed or None)
  dspec_in = P(ep_axes or None, summed or None, None)
  y = jax.shard_map(shard, mesh=mesh, in_specs=(tspec, tspec, tspec, wspec_in, wspec_in, dspec_in),
                    out_specs=tspec)(x, r.experts, r.weights, gate, up, down)
  return constrain(y, ('act_batch', 'act_length', 'act_embed'))
