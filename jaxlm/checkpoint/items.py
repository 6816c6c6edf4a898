"""The two Orbax items of a step directory and the managers that read and write them.

``state``: the train state's sharded arrays (every process writes its shards);
``data``: the Grain iterator's position as JSON.
"""

import jax
import orbax.checkpoint as ocp


def manager(directory: str, options) -> ocp.CheckpointManager:
  """A manager of ``state`` + ``data`` steps under ``directory``."""
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()})


def options(keep: int | None, async_save: bool, read_only: bool, **kw):
  """Manager options: at most ``keep`` steps (None: all), plus ``kw`` (keep_period, best_fn)."""
  return ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
      cleanup_tmp_directories=not read_only,  # what a failed or killed save left behind
      **kw)


def save_args(state, data_state: dict | None):
  return ocp.args.Composite(state=ocp.args.StandardSave(state),
                            data=ocp.args.JsonSave(data_state or {}))


def restore(mgr, step: int, abstract_state):
  """(state, data) of ``step`` restored onto ``abstract_state``'s shardings."""
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


def saved_tree(mgr, step: int):
  """The saved state's metadata tree, or None when it cannot be read (a restore reports it)."""
  try:
    meta = mgr.item_metadata(step)['state']
  except Exception:  # noqa: BLE001  (unreadable metadata is reported by restore)
    return None
  return getattr(meta, 'tree', meta)


def restore_subtree(directory: str, step: int, abstract_tree: dict, with_data: bool = False):
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


def _restore_arg(x):
  if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
    return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
  return ocp.RestoreArgs()
