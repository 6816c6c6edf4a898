"""The optax optimizer: AdamW with warmup + decay, clipping and a decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.core.errors import ConfigError
from jaxlm.core.tree import key_name


def horizon(cfg) -> int:
  """Steps the schedule decays over: ``optim.decay_steps``, or ``train.steps`` when 0.

  A run saves the resolved value in config.json (see ``resume_horizon``), so a
  later change of ``train.steps`` does not move the schedule under a live run.
  """
  return cfg.optim.decay_steps or cfg.train.steps


def resume_horizon(cfg, saved: int | None, step: int) -> int:
  """The horizon for a run resuming at ``step`` whose workdir saved horizon ``saved``.

  A new horizon (a new ``train.steps`` with ``optim.decay_steps`` unset, or a
  new ``optim.decay_steps``) is taken if the lr at ``step`` stays the same, as
  for 'constant', 'wsd' before its decay, or any schedule during warmup;
  otherwise it is refused with a ConfigError that names the field to set.
  """
  new = horizon(cfg)
  if saved is None or step == 0 or new == saved:
    return new
  o = cfg.optim
  was, now = float(schedule(o, saved)(step)), float(schedule(o, new)(step))
  if np.isclose(was, now, rtol=1e-6, atol=0.0):
    return new
  field = (f'optim.decay_steps={o.decay_steps}' if o.decay_steps
           else f'train.steps={cfg.train.steps}')
  raise ConfigError(
      f"{field} would move the '{o.schedule}' schedule's horizon from {saved} to {new} steps "
      f'and make the lr jump at step {step} ({was:.3g} -> {now:.3g}); pass '
      f'--config.optim.decay_steps={saved} to keep the schedule (or use optim.schedule=wsd '
      'for runs that may be extended)')


def schedule(o, steps: int) -> optax.Schedule:
  """Linear warmup to ``o.lr``, then decay to ``o.lr * min_lr_ratio`` by step ``steps``.

  'cosine' and 'linear' decay over all steps after warmup; 'constant' holds the
  peak; 'wsd' (warmup-stable-decay, as in MiniCPM) holds the peak and decays
  linearly over the last ``o.decay_fraction`` of ``steps``, so a run can be
  extended at any point before its decay starts without a jump in the lr.
  Past ``steps`` every schedule stays at its final value.
  """
  warm = max(min(o.warmup_steps, steps - 1), 0)
  end = o.lr * o.min_lr_ratio
  decay_steps = max(steps - warm, 1)
  if o.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.min_lr_ratio)
  elif o.schedule == 'linear':
    decay = optax.linear_schedule(o.lr, end, decay_steps)
  elif o.schedule == 'wsd':
    tail = min(max(int(round(steps * o.decay_fraction)), 1), decay_steps)
    decay = optax.join_schedules(
        [optax.constant_schedule(o.lr), optax.linear_schedule(o.lr, end, tail)],
        [decay_steps - tail])
  else:
    decay = optax.constant_schedule(o.lr)
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), decay], [warm])


def decay_mask(params, exclude: str):
  """True for parameters that get weight decay: all but those whose path has an excluded part."""
  words = [w.strip() for w in exclude.split(',') if w.strip()]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not any(w in key_name(p) for w in words), params)


def make_optimizer(o, steps: int) -> optax.GradientTransformation:
  """AdamW on ``schedule(o, steps)``; ``steps`` is the schedule horizon (see ``horizon``)."""
  mu_dtype = jnp.dtype(o.mu_dtype) if o.mu_dtype else None
  parts = []
  if o.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.clip_norm))
  parts.append(optax.adamw(schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=mu_dtype,
                           weight_decay=o.weight_decay,
                           mask=lambda p: decay_mask(p, o.decay_exclude)))
  return optax.chain(*parts)
