"""Keeps a failed checkpoint save to the one line the CLI prints (no thread or asyncio noise).

Process-wide (loggers and ``sys.unraisablehook``), so only the CLI's process
setup installs it (jaxlm.run.runtime.setup_logging); a program that imports
jaxlm as a library keeps its own logging.
"""

import logging
import sys


class DropOrbaxErrors(logging.Filter):
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


def quiet_orbax_errors() -> None:
  """Installs the filter on the 'absl' and 'asyncio' loggers and wraps
  ``sys.unraisablehook`` (once; calling it again changes nothing)."""
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, DropOrbaxErrors) for f in logger.filters):
      logger.addFilter(DropOrbaxErrors())
  if not getattr(sys.unraisablehook, 'jaxlm', False):
    sys.unraisablehook = unraisable_hook(sys.unraisablehook)


def unraisable_hook(previous):
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
