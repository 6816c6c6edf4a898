"""Orbax checkpoints of the train state plus the data iterator's position.

Each step directory holds ``state`` (params, optimizer state, step; sharded
arrays written by every process) and ``data`` (the Grain iterator state as
JSON). Orbax writes into a temporary directory and renames it on commit, so a
save killed half-way is never listed as a step.

With ``checkpoint.keep_best=K`` the K checkpoints with the lowest eval loss are
also kept, in ``<workdir>/checkpoints_best``: a separate Orbax manager, because
one manager ranks either by recency (keep last K + every M-th) or by a metric,
not both. ``restore(step)`` finds a step in either directory.

Every save first checks that the state is finite (a NaN checkpoint would rotate
the good ones away), and a failed write (no space, permission, I/O error, a
bucket gone) becomes one ``StorageError`` naming the step, path, OS error and
the latest committed step. The next run deletes the partial ``*.orbax-checkpoint-tmp*``
directory such a failure leaves.
"""

import dataclasses
import errno
import logging
import os
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlm.core import sharding, storage
from jaxlm.core.errors import (CheckpointError, ConfigError, DivergedError, JaxlmError, StorageError,
                          fault_reason)
from jaxlm.core.tree import all_finite, key_name

log = logging.getLogger('jaxlm')
BEST_METRIC = 'eval/loss'
# TrainState fields added after the first release, each fresh at zero (jaxlm.optim.step.new_state):
# a checkpoint without them still resumes.
UPGRADABLE = {'skipped_steps', 'bad_steps', 'loss_avg'}


class Checkpointer:
  """Saves and restores ``(state, data_state)`` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, ckpt_cfg, read_only: bool = False):
    storage.check(workdir)  # names the cloud extra before Orbax raises ImportError
    root = storage.absolute(workdir).rstrip('/')
    self.directory = root + '/checkpoints'
    self.best_directory = root + '/checkpoints_best'
    _quiet_orbax_errors()
    self.manager = _manager(self.directory, ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep,
        keep_period=ckpt_cfg.keep_period or None,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=not read_only,
        cleanup_tmp_directories=not read_only,  # what a failed or killed save left behind
    ))
    self._pending: int | None = None  # step of the last save, maybe still writing
    self.keep_best = ckpt_cfg.get('keep_best', 0)
    self.best = None  # opened on first use: most runs never write or read it
    self._best_losses: dict[int, float] = {}
    self._best_options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep_best or None,
        best_fn=lambda metrics: metrics[BEST_METRIC],
        best_mode='min',
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
    )

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
    """Saves ``state`` at ``step`` (in the background if async); refuses a non-finite state."""
    self._check_finite(step, state)
    with self._storage(step, self.directory):
      saved = self.manager.save(step, args=_save_args(state, data_state), force=force)
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

  def _storage(self, step: int, directory: str):
    return _StorageFaults(self, step, directory)

  def _best_manager(self):
    if self.best is None:
      self.best = _manager(self.best_directory, self._best_options)
    return self.best

  def best_steps(self) -> dict[int, float]:
    """{step: eval loss} of the kept best checkpoints (empty when there are none)."""
    if self.best is None and not _exists(self.best_directory):
      return {}
    best = self._best_manager()
    out = {}
    for s in sorted(best.all_steps()):
      if s not in self._best_losses:
        metrics = best.metrics(s)  # None until an async save of this process commits
        if metrics is None:
          continue
        self._best_losses[s] = float(metrics[BEST_METRIC])
      out[s] = self._best_losses[s]
    return out

  def save_best(self, step: int, state, data_state: dict | None, eval_loss: float) -> bool:
    """Saves into checkpoints_best if ``eval_loss`` ranks among the ``keep_best`` lowest."""
    if not self.keep_best:
      return False
    if not np.isfinite(eval_loss):
      log.info('checkpoint: eval/loss is %s at step %d; not ranked among the best', eval_loss, step)
      return False
    kept = self.best_steps()
    if step in kept or (len(kept) >= self.keep_best and eval_loss >= max(kept.values())):
      return False  # would be deleted at once; skip the write
    self._check_finite(step, state)
    self._best_losses[step] = float(eval_loss)
    with self._storage(step, self.best_directory):
      return self._best_manager().save(step, args=_save_args(state, data_state),
                                       metrics={BEST_METRIC: float(eval_loss)}, force=True)

  def check(self) -> None:
    """Raises StorageError if a background save has failed (cheap; call it often)."""
    for m, directory in ((self.manager, self.directory), (self.best, self.best_directory)):
      if m is not None:
        with self._storage(self._pending, directory):
          m.check_for_errors()

  def wait(self) -> None:
    """Blocks until background saves commit; raises StorageError if one failed."""
    for m, directory in ((self.manager, self.directory), (self.best, self.best_directory)):
      if m is not None:
        with self._storage(self._pending, directory):
          m.wait_until_finished()

  def close(self) -> None:
    for m, directory in ((self.manager, self.directory), (self.best, self.best_directory)):
      if m is not None:
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
    for m in (self.manager, self.best):
      try:
        if m is not None:
          m.close()
      except Exception:  # noqa: BLE001,S110  (the error in flight is the one to report)
        pass

  def _saved_tree(self, manager, step: int):
    """The saved state's metadata tree, or None when it cannot be read (restore reports it)."""
    try:
      meta = manager.item_metadata(step)['state']
    except Exception:  # noqa: BLE001  (unreadable metadata is reported by restore)
      return None
    return getattr(meta, 'tree', meta)

  def holds_params_only(self, step: int) -> bool:
    """True for a step saved without optimizer state (``jaxlm convert --from_hf`` writes one)."""
    manager = self.manager if step in self.steps() else self._best_manager()
    tree = self._saved_tree(manager, step)
    return isinstance(tree, dict) and 'params' in tree and 'opt_state' not in tree

  @staticmethod
  def _predates(tree, abstract_state) -> list[str]:
    """TrainState counters the saved ``tree`` has no entry for: an older jaxlm wrote it."""
    if not isinstance(tree, dict) or not hasattr(abstract_state, 'params'):
      return []
    missing = [f.name for f in dataclasses.fields(abstract_state) if f.name not in tree]
    return missing if set(missing) <= UPGRADABLE else []

  @staticmethod
  def _check_shapes(tree, directory: str, step: int, abstract_state) -> None:
    """Names the first parameter whose shape in the saved ``tree`` differs from the model's."""
    if tree is None:
      return
    saved = {key_name(p): getattr(v, 'shape', None)
             for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    for p, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
      key = key_name(p)
      if key in saved and saved[key] is not None and tuple(saved[key]) != tuple(v.shape):
        raise CheckpointError(
            f'checkpoint step {step} in {directory}: parameter {key} has shape '
            f'{tuple(saved[key])} but the config gives {tuple(v.shape)}')

  def _find(self, step: int):
    """(manager, directory) holding committed ``step``: the latest steps' or the best's."""
    if step in self.steps():
      return self.manager, self.directory
    best_steps = sorted(self.best_steps())
    if step not in best_steps:
      best = f'; best by eval loss: {best_steps}' if best_steps else ''
      raise CheckpointError(f'no checkpoint for step {step} in {self.directory} '
                            f'(available: {self.steps() or "none"}{best})')
    return self.best, self.best_directory

  def step_dir(self, step: int) -> str:
    """The directory of committed ``step`` (jaxlm.checkpoint.param_store reads single params there)."""
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
    tree = self._saved_tree(manager, step)  # one metadata read for both checks
    self._check_shapes(tree, manager.directory, step, abstract_state)
    bad = sharding.indivisible(abstract_state)
    if bad:  # Orbax would report this as an unreadable checkpoint
      raise ConfigError(f'checkpoint step {step} cannot be placed on this mesh: {bad} '
                        '(choose mesh sizes that divide it)')
    missing = [] if params_only else self._predates(tree, abstract_state)
    try:
      if params_only:
        return _restore_subtree(directory, step, abstract_state)['params'], None
      if missing:
        # Written before these counters existed: read the rest, start them fresh.
        log.warning('checkpoint step %d predates %s (an older jaxlm wrote it); starting them '
                    'at zero', step, ', '.join(missing))
        fields = {f.name: getattr(abstract_state, f.name)
                  for f in dataclasses.fields(abstract_state) if f.name not in missing}
        saved, data = _restore_subtree(directory, step, fields, with_data=True)
        fresh = {name: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)
                 for name, x in ((n, getattr(abstract_state, n)) for n in missing)}
        return abstract_state.replace(**saved, **fresh), data or None
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001  (tensorstore/orbax raise many types)
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f'checkpoint step {step} in {directory} is corrupt or incomplete '
          f'({type(e).__name__}: {first[:200]}); pass --restore_step=N to use an '
          f'earlier one (available: {self.steps()})') from None
    return restored['state'], restored['data'] or None


class _StorageFaults:
  """Context manager: any failure inside (Orbax's writes and waits) becomes one StorageError."""

  def __init__(self, ckpt: Checkpointer, step: int | None, directory: str):
    self.ckpt, self.step, self.directory = ckpt, step, directory

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc is None or not isinstance(exc, Exception) or isinstance(exc, JaxlmError):
      return False
    # Whatever TensorStore, gcsfs or s3fs raise (ValueError 'Malformed StorageGeneration',
    # HttpError, ClientError...) while Orbax writes is a storage fault: one line, exit 4.
    reason = os_error(exc) or fault_reason(exc)
    step = _failed_step(exc, self.ckpt._pending, self.step)
    try:
      # Read back from storage: Orbax lists an async save's step as soon as the save starts,
      # so a failure it reports on the next call would name the failed step as committed.
      self.ckpt.manager.reload()
      latest = self.ckpt.manager.latest_step()
    except Exception:  # noqa: BLE001  (the storage may be gone altogether)
      latest = None
    where = f'{self.directory}/{step}' if step is not None else self.directory
    committed = (f'step {latest} in {self.ckpt.directory}' if latest is not None
                 else 'none (a rerun starts from scratch)')
    raise StorageError(f'saving checkpoint step {step} to {where} failed: {reason}; latest '
                       f'committed checkpoint: {committed}; fix the storage and rerun the '
                       'same command to resume') from None


def os_error(exc: BaseException) -> str | None:
  """'ENOSPC (No space left on device)' if ``exc`` (or its cause) is an I/O failure, else None.

  Python raises OSError; TensorStore (Orbax's array writer) raises ValueError
  with a status code and, for local files, the errno as ``os_error_code``.
  """
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno:
      return f'{errno.errorcode.get(exc.errno, exc.errno)} ({os.strerror(exc.errno)})'
    text = str(exc)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
      n = int(code[1])
      return f'{errno.errorcode.get(n, n)} ({os.strerror(n)})'
    status = re.match(r'\s*(RESOURCE_EXHAUSTED|PERMISSION_DENIED|NOT_FOUND|UNAVAILABLE|DATA_LOSS|'
                      r'UNAUTHENTICATED|FAILED_PRECONDITION)\b', text)
    if status:
      return f'{status[1]} ({text.strip().splitlines()[0][:200]})'
    exc = exc.__cause__ or exc.__context__
  return None


def _failed_step(exc: BaseException, pending: int | None, current: int | None) -> int | None:
  """The step whose write failed: Orbax reports an earlier async save's failure on the next call."""
  for step in (pending, current):
    if step is not None and re.search(rf'/{step}(\.orbax-checkpoint-tmp|/)', str(exc)):
      return step
  return pending if pending is not None else current


@jax.jit
def _all_finite(state):
  return all_finite(state)


class _DropOrbaxErrors(logging.Filter):
  """Drops error records of Orbax's save machinery: the failure is raised to the caller, who
  reports it once. Orbax's threads log it (absl), and asyncio logs each of its write tasks
  whose exception nobody retrieved ('Task exception was never retrieved')."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if '/orbax/' in record.pathname or '/orbax/' in record.getMessage():
      return False
    # Orbax's file writes also run as bare asyncio futures; their I/O errors (OSError, or
    # TensorStore's ValueError 'Error writing ...') are the same failure, raised to the caller.
    exc = record.exc_info[1] if record.exc_info else None
    io_error = isinstance(exc, OSError) or (isinstance(exc, ValueError)
                                            and 'Error writing' in str(exc))
    return not (record.name == 'asyncio' and io_error
                and 'exception was never retrieved' in record.getMessage())


def _quiet_orbax_errors() -> None:
  """Keeps a failed save to the one line the caller prints (no thread or asyncio noise)."""
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
      logger.addFilter(_DropOrbaxErrors())
  if not getattr(sys.unraisablehook, 'jaxlm', False):
    sys.unraisablehook = _unraisable_hook(sys.unraisablehook)


def _unraisable_hook(previous):
  """Drops the echoes of a failed async save; passes everything else to ``previous``.

  When one array write fails, Orbax closes its asyncio loop while TensorStore's
  other writes are still finishing; their completion callbacks then hit the
  closed loop ('Event loop is closed'), and coroutines left pending are
  finalized at interpreter exit. Python reports each as an 'unraisable'
  exception, hundreds of lines in all, though the failure itself was already
  raised to the train loop.
  """

  def hook(u):
    code = getattr(u.object, 'cr_code', None)
    if (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == 'Event loop is closed') \
        or (code is not None and '/orbax/' in code.co_filename):
      return
    previous(u)

  hook.jaxlm = True
  return hook


def _manager(directory: str, options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()})


def _restore_subtree(directory: str, step: int, abstract_tree: dict, with_data: bool = False):
  """Restores the entries of ``abstract_tree`` only (with the data state if ``with_data``).

  StandardCheckpointHandler refuses a partial tree; the PyTree handler reads the same files
  and can restore a subtree.
  """
  handlers = {'state': ocp.PyTreeCheckpointHandler()}
  args = {'state': ocp.args.PyTreeRestore(
      item=abstract_tree, restore_args=jax.tree.map(_restore_arg, abstract_tree),
      partial_restore=True)}
  if with_data:
    handlers['data'] = ocp.JsonCheckpointHandler()
    args['data'] = ocp.args.JsonRestore()
  reader = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                 item_handlers=handlers)
  try:
    restored = reader.restore(step, args=ocp.args.Composite(**args))
  finally:
    reader.close()
  return (restored['state'], restored['data']) if with_data else restored['state']


def _save_args(state, data_state: dict | None):
  return ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave(data_state or {}))


def _exists(directory: str) -> bool:
  return storage.path(directory).is_dir()


def _restore_arg(x):
  if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
    return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
  return ocp.RestoreArgs()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) for every array in ``tree``."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))
      if isinstance(x, (jax.Array, np.ndarray)) else x, tree)
