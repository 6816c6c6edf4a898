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


def shapes(tree) -> dict[str, tuple | None]:
  """{key_name: shape} of every leaf of ``tree`` (None for a leaf without a shape)."""
  return {key_name(p): None if getattr(x, 'shape', None) is None else tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def misfits(want: dict, got: dict) -> list[tuple[str, tuple, tuple | None]]:
  """``(name, got shape, wanted shape)`` for each entry of ``got`` (name -> shape, as
  ``shapes`` gives) that does not fit ``want``, in ``got``'s order; the wanted shape is
  None where ``want`` has no such name. An unknown (None) shape fits any. The names
  ``got`` lacks are ``set(want) - set(got)``."""
  out = []
  for name, shape in got.items():
    if name not in want:
      out.append((name, None if shape is None else tuple(shape), None))
    elif None not in (shape, want[name]) and tuple(shape) != tuple(want[name]):
      out.append((name, tuple(shape), tuple(want[name])))
  return out
