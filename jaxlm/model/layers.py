"""Building blocks shared by the GPT-2 and Llama variants: dense, norm, MLP, RoPE.

Every parameter is created through ``param_init`` with logical axis names;
jaxlm.core.sharding maps those names to the mesh.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxlm.core import platform
from jaxlm.core.sharding import constrain


def dtype_of(name: str):
  return jnp.dtype(name)


def param_init(std: float, axes: Sequence[str]):
  """Normal(std) initializer tagged with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes))


def zeros_init(axes: Sequence[str]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes))


def ones_init(axes: Sequence[str]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), tuple(axes))


def _contract_last(x, kernel, n_in: int) -> jax.Array:
  """x [..., *in_dims] @ kernel [*in_dims, *features] -> [..., *features]."""
  contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  return jax.lax.dot_general(x, kernel, (contract, ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract_last_cpu(x, kernel, n_in: int) -> jax.Array:
  """``_contract_last`` whose backward keeps the output gradient out of XLA:CPU's transposes.

  The kernel gradient x^T @ dy needs one operand transposed in memory on
  XLA:CPU; left alone, XLA fuses dy's producers (GELU/norm backward) into that
  transpose, which then runs as a strided, unvectorized loop (~40% of a small
  GPT step). The barrier makes dy a plain array first. Same dots as autodiff.
  """
  return _contract_last(x, kernel, n_in)


def _contract_last_fwd(x, kernel, n_in):
  return _contract_last(x, kernel, n_in), (x, kernel)


def _contract_last_bwd(n_in, res, dy):
  x, kernel = res
  x, dy = jax.lax.optimization_barrier((x, dy))
  lead = tuple(range(x.ndim - n_in))
  out = tuple(range(len(lead), dy.ndim))
  dx = jax.lax.dot_general(dy, kernel, ((out, tuple(range(n_in, kernel.ndim))), ((), ())))
  dk = jax.lax.dot_general(x, dy, ((lead, lead), ((), ())))
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_contract_last_cpu.defvjp(_contract_last_fwd, _contract_last_bwd)


class Dense(nn.Module):
  """x @ kernel (+ bias) over the last ``len(in_axes)`` axes of x.

  kernel is ``[*in_dims, *features]`` named ``in_axes + out_axes``; bias is
  ``[*features]``. Written out (rather than nn.DenseGeneral) so the kernel is
  created in its final shape and its logical names always match its rank.
  """
  features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  use_bias: bool = False
  std: float = 0.02
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_axes)
    shape = tuple(x.shape[-n_in:]) + tuple(self.features)
    pdt, cdt = dtype_of(self.param_dtype), dtype_of(self.dtype)
    kernel = self.param('kernel', param_init(self.std, self.in_axes + self.out_axes), shape, pdt)
    matmul = _contract_last_cpu if platform.cpu_tuned() else _contract_last
    y = matmul(x.astype(cdt), kernel.astype(cdt), n_in)
    if self.use_bias:
      bias = self.param('bias', zeros_init(self.out_axes), tuple(self.features), pdt)
      y = y + bias.astype(cdt)
    return y


class Norm(nn.Module):
  """LayerNorm (GPT-2) or RMSNorm (Llama) over the last axis, computed in fp32."""
  kind: str = 'layernorm'
  eps: float = 1e-5
  use_bias: bool = True
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    pdt = dtype_of(self.param_dtype)
    scale = self.param('scale', ones_init(('norm',)), (d,), pdt)
    xf = x.astype(jnp.float32)
    if self.kind == 'rmsnorm':
      y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    else:
      mean = jnp.mean(xf, -1, keepdims=True)
      var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
      y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32)
    if self.use_bias and self.kind == 'layernorm':
      y = y + self.param('bias', zeros_init(('norm',)), (d,), pdt).astype(jnp.float32)
    return y.astype(dtype_of(self.dtype))


class Mlp(nn.Module):
  """GELU MLP (GPT-2: tanh-approximate 'gelu'; erf 'gelu_exact') or SwiGLU (Llama);
  column- then row-parallel over 'mlp'."""
  cfg: object  # the model ConfigDict
  mlp_dim: int = 0  # hidden width; 0 = cfg.mlp_dim (MoE shared experts set their own)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [batch, length, embed]
    c = self.cfg
    kw = dict(use_bias=c.use_bias, std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype)
    up = lambda name: Dense((self.mlp_dim or c.mlp_dim,), ('embed',), ('mlp',), name=name, **kw)
    if c.activation == 'swiglu':
      h = nn.silu(up('gate')(x)) * up('up')(x)
    else:
      h = nn.gelu(up('up')(x), approximate=c.activation == 'gelu')
    h = constrain(h, ('act_batch', 'act_length', 'act_mlp'))
    # GPT-2 scales the residual-output projections by 1/sqrt(2 * layers).
    down_kw = {**kw, 'std': c.init_std / (2 * c.n_layers) ** 0.5}
    return Dense((c.d_model,), ('mlp',), ('embed',), name='down', **down_kw)(h)


def rope_frequencies(head_dim: int, c) -> np.ndarray:
  """Inverse frequencies [head_dim/2] of RoPE for model config ``c`` (fp32, static).

  ``rope_scaling='llama3'`` is Llama 3.1's long-context rule: wavelengths longer
  than ``rope_original_max_len / rope_low_freq_factor`` are slowed by
  ``rope_factor``, shorter than ``... / rope_high_freq_factor`` are kept, and
  the band between is interpolated smoothly.
  """
  freq = 1.0 / (c.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if c.rope_scaling == 'llama3':
    low, high = c.rope_low_freq_factor, c.rope_high_freq_factor
    wavelen = 2 * np.pi / freq
    smooth = (c.rope_original_max_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * freq / c.rope_factor + smooth * freq
    freq = np.where(wavelen > c.rope_original_max_len / low, freq / c.rope_factor,
                    np.where(wavelen < c.rope_original_max_len / high, freq, mid))
  return freq.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, freq: np.ndarray) -> jax.Array:
  """Rotary embedding. x: [batch, length, heads, head_dim]; positions: [batch, length].

  ``freq``: inverse frequencies [head_dim/2] from ``rope_frequencies``.
  """
  angle = positions[..., None].astype(jnp.float32) * jnp.asarray(freq)  # [batch, length, head_dim/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  # Half-split layout (as in HF Llama), so imported weights need no permutation.
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
