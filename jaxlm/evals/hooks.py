"""Hooks: plain callables the train loop runs on a schedule.

A hook takes a ``HookContext`` and returns a dict of metrics (or None); the
loop logs what it returns. Built-in evaluation and sampling use the same
mechanism as user hooks, so a user hook can do anything they do:

    def my_hook(ctx):
      return {'eval/my_metric': float(...)}

Register from Python with ``Trainer.add_hook(Hook(my_hook, every=100))`` or
from a config with ``--config.eval.hooks=my_module:my_hook`` (called every
``eval.every`` steps and at the end).
"""

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxlm.core import storage
from jaxlm.core.errors import ConfigError


@dataclasses.dataclass
class HookContext:
  """What a hook sees: the step, config, mesh, tokenizer, current state and helpers."""
  step: int
  cfg: Any
  mesh: Any
  tokenizer: Any
  state: Any  # TrainState: .params, .opt_state, .step
  model: Any
  workdir: str
  eval_loss: Callable[[list], float]  # mean token loss of the params on a list of batches
  generate: Callable[..., list[str]]  # generate(prompts, max_new_tokens=..., temperature=...)
  writer: Any = None  # MetricsWriter, for text outputs

  @property
  def params(self):
    return self.state.params


@dataclasses.dataclass
class Hook:
  """``fn(ctx) -> dict | None`` called every ``every`` steps (0 = never) and at the end.

  After SIGTERM/SIGINT (a preemption) the run saves and exits without running
  hooks, so evals cannot spend the grace period; ``on_preempt=True`` opts a
  hook in (it then runs after the final checkpoint's save has started).
  """
  fn: Callable[[HookContext], dict | None]
  every: int = 0
  at_end: bool = True
  name: str = ''
  on_preempt: bool = False

  def due(self, step: int, force: bool) -> bool:
    return (force and self.at_end) or (self.every > 0 and step % self.every == 0)


def run_hooks(hooks: list[Hook], ctx: HookContext, force: bool = False, before=None) -> dict:
  """Runs every due hook (``before(name)`` first, e.g. to time it); returns their metrics."""
  out = {}
  for hook in hooks:
    if hook.due(ctx.step, force):
      if before is not None:
        before(hook.name or getattr(hook.fn, '__name__', 'hook'))
      out.update(hook.fn(ctx) or {})
  return out


def eval_loss_hook(eval_sets: dict[str, list], every: int) -> Hook:
  """Validation loss and perplexity on named eval sets (``eval/loss`` for 'val')."""

  def fn(ctx: HookContext):
    out = {}
    for name, batches in eval_sets.items():
      loss = ctx.eval_loss(batches)
      prefix = 'eval' if name == 'val' else f'eval/{name}'
      out[f'{prefix}/loss'] = loss
      out[f'{prefix}/perplexity'] = float(np.exp(min(loss, 50.0)))
    return out

  return Hook(fn, every=every, name='eval_loss')


def sample_hook(prompts: list[str], max_new_tokens: int, every: int) -> Hook:
  """Text continuations of fixed prompts, to tensorboard and <workdir>/samples.txt."""

  def fn(ctx: HookContext):
    texts = ctx.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40)
    if jax.process_index() == 0:
      storage.append_text(storage.join(ctx.workdir, 'samples.txt'), ''.join(
          f'--- step {ctx.step} | prompt {p!r}\n{p}{t}\n' for p, t in zip(prompts, texts)))
      if ctx.writer is not None:
        for i, (p, t) in enumerate(zip(prompts, texts)):
          ctx.writer.text(ctx.step, f'samples/{i}', p + t)
    return {}

  return Hook(fn, every=every, name='samples')


def load_user_hook(spec: str, every: int) -> Hook:
  """'package.module:function' -> Hook; the function takes a HookContext."""
  if ':' not in spec:
    raise ConfigError(f"eval.hooks entry '{spec}' must look like 'module:function'")
  mod_name, fn_name = spec.split(':', 1)
  try:
    fn = getattr(importlib.import_module(mod_name), fn_name)
  except ModuleNotFoundError as e:
    hint = (f" (is the folder holding '{mod_name.split('.')[0]}' on the import path? e.g. run "
            "with PYTHONPATH=. from that folder)" if e.name == mod_name.split('.')[0] else '')
    raise ConfigError(f"eval.hooks entry '{spec}' cannot be loaded: {e}{hint}") from None
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"eval.hooks entry '{spec}' cannot be loaded: {e}") from None
  return Hook(fn, every=every, name=spec)
