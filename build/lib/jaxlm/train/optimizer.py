"""The optax optimizer: AdamW with warmup + decay, clipping and a decay mask."""

import jax
import jax.numpy as jnp
import optax


def schedule(o, steps: int) -> optax.Schedule:
  """Linear warmup to ``o.lr`` then cosine/linear decay to ``o.lr * min_lr_ratio``."""
  warm = max(min(o.warmup_steps, steps - 1), 0)
  end = o.lr * o.min_lr_ratio
  decay_steps = max(steps - warm, 1)
  if o.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.min_lr_ratio)
  elif o.schedule == 'linear':
    decay = optax.linear_schedule(o.lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(o.lr)
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), decay], [warm])


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def decay_mask(params, exclude: str):
  """True for parameters that get weight decay: all but those whose path has an excluded part."""
  words = [w.strip() for w in exclude.split(',') if w.strip()]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not any(w in _path_name(p) for w in words), params)


def make_optimizer(o, steps: int) -> optax.GradientTransformation:
  mu_dtype = jnp.dtype(o.mu_dtype) if o.mu_dtype else None
  parts = []
  if o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  parts.append(optax.adamw(schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=mu_dtype,
                           weight_decay=o.weight_decay,
                           mask=lambda p: decay_mask(p, o.decay_exclude)))
  return optax.chain(*parts)
