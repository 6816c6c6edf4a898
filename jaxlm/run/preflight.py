"""Checks a command makes before it writes anything, and undoing what a refusal left.

A refused command (bad config, mesh, data or tokenizer: exit 2) must leave its
workdir as it was, so that the corrected command then runs. The checks here
run before the first byte is written; ``WorkdirGuard`` removes the empty
directories a refused command created on its way (the lock takes its file in
a new workdir, and the file goes on release).
"""

import contextlib
import os

from jaxlm.core import storage
from jaxlm.core.errors import EXIT_BAD_INPUT, ConfigError, JaxlmError


def _absolute(p: str) -> str:
  return p if not p or storage.is_remote(p) else os.path.abspath(os.path.expanduser(p))


def absolute_paths(cfg):
  """A copy of ``cfg`` with its local data paths absolute (gs:// and s3:// as given), so
  the config.json it is saved as works from any directory."""
  cfg = cfg.copy_and_resolve_references()
  d = cfg.data
  with cfg.unlocked():
    d.path, d.tokenizer_path = _absolute(d.path), _absolute(d.tokenizer_path)
    if d.mixture:
      from jaxlm.data import mixture  # noqa: PLC0415
      d.mixture = ','.join(f'{_absolute(p)}:{w!r}' for p, w in mixture.parse(d.mixture))
  return cfg


def check_vocab(cfg, tokenizer) -> None:
  """ConfigError naming the flag to pass when the tokenizer has more ids than the model rows.

  An id past ``model.vocab_size`` reads no embedding row: its loss is NaN, not an error.
  """
  from jaxlm.hf.weights import VOCAB_MULTIPLE  # noqa: PLC0415  (the CLI imports this module early)
  need = tokenizer.vocab_size
  if need > cfg.model.vocab_size:
    fix = -(-need // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    raise ConfigError(f'model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer '
                      f'vocabulary ({need}): pass --config.model.vocab_size={fix}')


def _only_empty_dirs(path: str) -> bool:
  for _, _, files in os.walk(path):
    if files:
      return False
  return True


class WorkdirGuard(contextlib.AbstractContextManager):
  """``with WorkdirGuard(workdir):`` a command that creates ``workdir`` and is then refused
  (a JaxlmError with exit 2) leaves no directory behind, as long as it wrote no file.
  A workdir that existed, or holds a file, is never touched: the checks come first."""

  def __init__(self, workdir: str | None):
    self.workdir = workdir if workdir and not storage.is_remote(workdir) else None
    self.existed = self.workdir is None or os.path.lexists(self.workdir)

  def __exit__(self, exc_type, exc, tb):
    refused = isinstance(exc, JaxlmError) and exc.exit_code == EXIT_BAD_INPUT
    if refused and not self.existed and os.path.isdir(self.workdir) and \
        _only_empty_dirs(self.workdir):
      for root, dirs, _ in os.walk(self.workdir, topdown=False):
        for d in dirs:
          os.rmdir(os.path.join(root, d))
      os.rmdir(self.workdir)
    return False


def workdir_arg(argv: list[str]) -> str | None:
  """The --workdir value in a command line, if any."""
  for i, a in enumerate(argv):
    if a.startswith('--workdir='):
      return a.split('=', 1)[1]
    if a == '--workdir' and i + 1 < len(argv):
      return argv[i + 1]
  return None
