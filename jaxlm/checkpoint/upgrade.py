"""Restoring a TrainState saved by an older jaxlm, before some of its fields existed.

Each field added after the first release starts fresh at zero
(jaxlm.optim.step.new_state), so such a checkpoint still resumes: the saved
fields are read as they are, the missing ones are created.
"""

import dataclasses
import logging

import jax
import numpy as np

from jaxlm.checkpoint import items

log = logging.getLogger('jaxlm')
UPGRADABLE = {'skipped_steps', 'bad_steps', 'loss_avg'}


def predates(tree, abstract_state) -> list[str]:
  """TrainState counters the saved ``tree`` has no entry for: an older jaxlm wrote it."""
  if not isinstance(tree, dict) or not hasattr(abstract_state, 'params'):
    return []
  missing = [f.name for f in dataclasses.fields(abstract_state) if f.name not in tree]
  return missing if set(missing) <= UPGRADABLE else []


def restore(directory: str, step: int, abstract_state, missing: list[str]):
  """(state, data) of ``step``, its ``missing`` fields (from ``predates``) started at zero."""
  log.warning('checkpoint step %d predates %s (an older jaxlm wrote it); starting them '
              'at zero', step, ', '.join(missing))
  fields = {f.name: getattr(abstract_state, f.name)
            for f in dataclasses.fields(abstract_state) if f.name not in missing}
  saved, data = items.restore_subtree(directory, step, fields, with_data=True)
  fresh = {name: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)
           for name, x in ((n, getattr(abstract_state, n)) for n in missing)}
  return abstract_state.replace(**saved, **fresh), data
