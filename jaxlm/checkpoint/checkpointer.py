"""Orbax checkpoints of the train state plus the data iterator's position.

Each step directory holds ``state`` (params, optimizer state, step; sharded
arrays written by every process) and ``data`` (the Grain iterator state as
JSON; jaxlm.checkpoint.items). Orbax writes into a temporary directory and
renames it on commit, so a save killed half-way is never listed as a step.

With ``checkpoint.keep_best=K`` the K checkpoints with the lowest eval loss are
also kept, in ``<workdir>/checkpoints_best`` (jaxlm.checkpoint.best);
``restore(step)`` finds a step in either directory. A checkpoint an older jaxlm
wrote still restores (jaxlm.checkpoint.upgrade).

Every save first checks that the state is finite (a NaN checkpoint would rotate
the good ones away), and a failed write (no space, permission, I/O error, a
bucket gone) becomes one ``StorageError`` naming the step, path, OS error and
the latest committed step (jaxlm.checkpoint.faults). The next run deletes the
partial ``*.orbax-checkpoint-tmp*`` directory such a failure leaves.
"""

import jax
import numpy as np

from jaxlm.checkpoint import items, upgrade
from jaxlm.checkpoint.best import BestCheckpoints
from jaxlm.checkpoint.faults import StorageFaults
from jaxlm.core import sharding, storage
from jaxlm.core.errors import CheckpointError, ConfigError, DivergedError
from jaxlm.core.tree import all_finite, misfits, shapes


class Checkpointer:
  """Saves and restores ``(state, data_state)`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, ckpt_cfg, read_only: bool = False):
    storage.check(workdir)  # names the cloud extra before Orbax raises ImportError
    root = storage.absolute(workdir).rstrip('/')
    self.directory = root + '/checkpoints'
    self.best_directory = root + '/checkpoints_best'
    self.manager = items.manager(self.directory, items.options(
        ckpt_cfg.keep, ckpt_cfg.async_save, read_only, keep_period=ckpt_cfg.keep_period or None))
    self._pending: int | None = None  # step of the last save, maybe still writing
    self.keep_best = ckpt_cfg.get('keep_best', 0)
    self._best = BestCheckpoints(self.best_directory, self.keep_best, ckpt_cfg.async_save,
                                 read_only)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def pick_step(self, restore_step: int | None) -> int | None:
    """``restore_step`` if given, else the latest committed step (None when there is none)."""
    return restore_step if restore_step is not None else self.latest_step()

  def require_step(self, restore_step: int | None) -> int:
    """``pick_step``, or a CheckpointError when there is no checkpoint to read."""
    step = self.pick_step(restore_step)
    if step is None:
      raise CheckpointError(f"no checkpoint in '{self.directory}' (train first)")
    return step

  def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` (in the background if async); refuses a non-finite state."""
    self._check_finite(step, state)
    with self._storage(step, self.directory):
      saved = self.manager.save(step, args=items.save_args(state, data_state), force=force)
    if saved:
      self._pending = step
    return saved

  def _check_finite(self, step: int, state) -> None:
    if bool(_all_finite(state)):
      return
    latest = self.latest_step()
    raise DivergedError(
        f'refusing to save step {step}: the train state has non-finite values; the last '
        f"good checkpoint is {'step ' + str(latest) if latest is not None else 'none'} "
        f'in {self.directory}')

  def _storage(self, step: int | None, directory: str) -> StorageFaults:
    return StorageFaults(self.manager, self.directory, self._pending, step, directory)

  def best_steps(self) -> dict[int, float]:
    """{step: eval loss} of the kept best checkpoints (empty when there are none)."""
    return self._best.steps()

  def save_best(self, step: int, state, data_state: dict | None, eval_loss: float) -> bool:
    """Saves into checkpoints_best if ``eval_loss`` ranks among the ``keep_best`` lowest."""
    if not self._best.ranks(step, eval_loss):
      return False
    self._check_finite(step, state)
    with self._storage(step, self.best_directory):
      return self._best.save(step, state, data_state, eval_loss)

  def _managers(self):
    """(manager, directory) of each open Orbax manager."""
    pairs = ((self.manager, self.directory), (self._best.manager, self.best_directory))
    return [(m, d) for m, d in pairs if m is not None]

  def check(self) -> None:
    """Raises StorageError if a background save has failed (cheap; call it often)."""
    for m, directory in self._managers():
      with self._storage(self._pending, directory):
        m.check_for_errors()

  def wait(self) -> None:
    """Blocks until background saves commit; raises StorageError if one failed."""
    for m, directory in self._managers():
      with self._storage(self._pending, directory):
        m.wait_until_finished()

  def close(self) -> None:
    for m, directory in self._managers():
      with self._storage(self._pending, directory):
        m.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    # Also on errors (and a second Ctrl-C): closing finishes a save in flight, and an
    # unclosed manager's background threads fail noisily or hang at exit.
    if exc_type is None:
      self.close()
      return
    for m, _directory in self._managers():
      try:
        m.close()
      except Exception:  # noqa: BLE001,S110  (the error in flight is the one to report)
        pass

  def holds_params_only(self, step: int) -> bool:
    """True for a step saved without optimizer state (``jaxlm convert --from_hf`` writes one)."""
    manager = self.manager if step in self.steps() else self._best.opened()
    tree = items.saved_tree(manager, step)
    return isinstance(tree, dict) and 'params' in tree and 'opt_state' not in tree

  def _find(self, step: int):
    """(manager, directory) holding committed ``step``: the latest steps' or the best's."""
    if step in self.steps():
      return self.manager, self.directory
    best_steps = sorted(self.best_steps())
    if step not in best_steps:
      best = f'; best by eval loss: {best_steps}' if best_steps else ''
      raise CheckpointError(f'no checkpoint for step {step} in {self.directory} '
                            f'(available: {self.steps() or "none"}{best})')
    return self._best.manager, self.best_directory

  def step_dir(self, step: int) -> str:
    """The directory of committed ``step`` (jaxlm.checkpoint.param_store reads single params
    there)."""
    return self._find(step)[1] + '/' + str(step)

  def restore(self, step: int, abstract_state, params_only: bool = False):
    """Restores onto ``abstract_state``'s shardings (any mesh). Returns (state, data_state).

    ``params_only``: reads only the parameters (no optimizer state, e.g. to
    fine-tune); ``abstract_state`` may be a TrainState or just its params, and
    the result is ``(params, None)``.
    """
    manager, directory = self._find(step)
    if params_only:
      abstract_state = {'params': getattr(abstract_state, 'params', abstract_state)}
    tree = items.saved_tree(manager, step)  # one metadata read for both checks
    _check_shapes(tree, manager.directory, step, abstract_state)
    bad = sharding.indivisible(abstract_state)
    if bad:  # Orbax would report this as an unreadable checkpoint
      raise ConfigError(f'checkpoint step {step} cannot be placed on this mesh: {bad} '
                        '(choose mesh sizes that divide it)')
    missing = [] if params_only else upgrade.predates(tree, abstract_state)
    try:
      if params_only:
        return items.restore_subtree(directory, step, abstract_state)['params'], None
      if missing:  # written before these counters existed: read the rest, start them fresh
        state, data = upgrade.restore(directory, step, abstract_state, missing)
      else:
        state, data = items.restore(manager, step, abstract_state)
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001  (tensorstore/orbax raise many types)
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f'checkpoint step {step} in {directory} is corrupt or incomplete '
          f'({type(e).__name__}: {first[:200]}); pass --restore_step=N to use an '
          f'earlier one (available: {self.steps()})') from None
    return state, data or None


def restore_params(workdir: str, ckpt_cfg, abstract_state, restore_step: int | None = None):
  """(params, step): the parameters of ``restore_step`` (default: the latest) of the run in
  ``workdir``, placed like ``abstract_state``'s; CheckpointError when it has none."""
  with Checkpointer(workdir, ckpt_cfg, read_only=True) as ckpt:
    step = ckpt.require_step(restore_step)
    params, _ = ckpt.restore(step, abstract_state, params_only=True)
  return params, step


def _check_shapes(tree, directory: str, step: int, abstract_state) -> None:
  """Names the first parameter whose shape in the saved ``tree`` differs from the model's."""
  if tree is None:
    return
  for key, want, saved in misfits(shapes(tree), shapes(abstract_state)):
    if saved is not None:  # a name the saved tree lacks is reported by the restore
      raise CheckpointError(f'checkpoint step {step} in {directory}: parameter {key} has shape '
                            f'{saved} but the config gives {want}')


@jax.jit
def _all_finite(state):
  return all_finite(state)


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) for every array in ``tree``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))
      if isinstance(x, (jax.Array, np.ndarray)) else x, tree)
