"""Helpers over pytrees of arrays that several layers need (no jaxlm imports)."""

import jax
import jax.numpy as jnp


def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of ``tree`` is finite (a bool scalar)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def key_name(path) -> str:
  """'params/layers/mlp/down/kernel' for a pytree key path (dict, attribute or index keys)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
