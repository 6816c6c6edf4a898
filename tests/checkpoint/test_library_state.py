"""jaxlm used as a library leaves the program's process-wide state alone: its loggers'
filters and handlers and sys.unraisablehook (the CLI quiets Orbax; see jaxlm.run.runtime)."""

import os
import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent('''
  import logging, sys, tempfile

  class Mine(logging.Filter):
    pass

  def my_hook(u):
    pass

  loggers = [logging.getLogger(n) for n in ('absl', 'asyncio', 'jaxlm')]
  for logger in loggers:
    logger.addFilter(Mine())
    logger.addHandler(logging.NullHandler())
  sys.unraisablehook = my_hook
  before = [(list(l.filters), list(l.handlers), l.level) for l in loggers]

  import jax
  import jax.numpy as jnp
  import ml_collections
  import jaxlm  # noqa: F401
  from jaxlm.checkpoint.checkpointer import Checkpointer, abstract_like

  cfg = ml_collections.ConfigDict({'keep': 2, 'keep_period': 0, 'async_save': True,
                                   'keep_best': 1})
  state = {'params': {'w': jnp.arange(6.0).reshape(2, 3)}, 'step': jnp.int32(3)}
  with Checkpointer(tempfile.mkdtemp(), cfg) as ckpt:
    assert ckpt.save(3, state, {'pos': 1})
    ckpt.wait()
    assert ckpt.save_best(3, state, {'pos': 1}, 1.5)
    restored, data = ckpt.restore(3, abstract_like(state))
  assert data == {'pos': 1} and int(restored['step']) == 3, (data, restored)
  after = [(list(l.filters), list(l.handlers), l.level) for l in loggers]
  assert after == before, f'loggers changed: {before} -> {after}'
  assert sys.unraisablehook is my_hook, f'sys.unraisablehook replaced by {sys.unraisablehook}'
  print('unchanged')
''')


def test_a_checkpointer_changes_no_process_wide_logging_or_hooks(repo, tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(repo), 'JAX_PLATFORMS': 'cpu'}
  run = subprocess.run([sys.executable, '-c', PROGRAM], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0 and 'unchanged' in run.stdout, run.stderr[-3000:]
