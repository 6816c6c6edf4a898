"""``checkpoint.keep_best=K``: the K checkpoints with the lowest eval loss.

They live in ``<workdir>/checkpoints_best``, under a second Orbax manager: one
manager ranks either by recency (keep last K + every M-th) or by a metric, not
both.
"""

import logging

import numpy as np

from jaxlm.checkpoint import items
from jaxlm.core import storage

log = logging.getLogger('jaxlm')
METRIC = 'eval/loss'


class BestCheckpoints:
  """The best-by-eval-loss steps in ``directory``, opened on first use (most runs never
  write or read them)."""

  def __init__(self, directory: str, keep: int, async_save: bool, read_only: bool):
    self.directory, self.keep = directory, keep
    self.manager = None
    self._losses: dict[int, float] = {}
    self._options = items.options(keep or None, async_save, read_only,
                                  best_fn=lambda metrics: metrics[METRIC], best_mode='min')

  def opened(self):
    """The Orbax manager (opened now if it was not)."""
    if self.manager is None:
      self.manager = items.manager(self.directory, self._options)
    return self.manager

  def steps(self) -> dict[int, float]:
    """{step: eval loss} of the kept best checkpoints (empty when there are none)."""
    if self.manager is None and not storage.path(self.directory).is_dir():
      return {}
    best = self.opened()
    out = {}
    for s in sorted(best.all_steps()):
      if s not in self._losses:
        metrics = best.metrics(s)  # None until an async save of this process commits
        if metrics is None:
          continue
        self._losses[s] = float(metrics[METRIC])
      out[s] = self._losses[s]
    return out

  def ranks(self, step: int, eval_loss: float) -> bool:
    """Whether ``eval_loss`` at ``step`` is among the ``keep`` lowest (worth a write)."""
    if not self.keep:
      return False
    if not np.isfinite(eval_loss):
      log.info('checkpoint: eval/loss is %s at step %d; not ranked among the best', eval_loss, step)
      return False
    kept = self.steps()
    # A step that would be deleted at once is not written.
    return not (step in kept or (len(kept) >= self.keep and eval_loss >= max(kept.values())))

  def save(self, step: int, state, data_state: dict | None, eval_loss: float) -> bool:
    """Writes ``step`` ranked by ``eval_loss`` (call ``ranks`` first)."""
    self._losses[step] = float(eval_loss)
    return self.opened().save(step, args=items.save_args(state, data_state),
                              metrics={METRIC: float(eval_loss)}, force=True)
