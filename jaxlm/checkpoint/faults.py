"""A failed checkpoint write, whatever raised it, becomes one StorageError line (exit 4).

Orbax's writers (TensorStore, gcsfs, s3fs) raise many types and report an async
save's failure on a later call; the line names the step that failed, the path,
the OS error and the latest committed step, so the user knows what a rerun
resumes from.
"""

import errno
import os
import re

from jaxlm.core.errors import JaxlmError, StorageError, fault_reason


class StorageFaults:
  """Context manager: any failure inside (Orbax's writes and waits) becomes one StorageError.

  ``manager`` holds the latest steps under ``latest_dir`` (read back for the latest
  committed one); ``pending``: the step of the last save, maybe still writing;
  ``step``: the step this call writes; ``directory``: where it writes.
  """

  def __init__(self, manager, latest_dir: str, pending: int | None, step: int | None,
               directory: str):
    self.manager, self.latest_dir = manager, latest_dir
    self.pending, self.step, self.directory = pending, step, directory

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc is None or not isinstance(exc, Exception) or isinstance(exc, JaxlmError):
      return False
    # Whatever TensorStore, gcsfs or s3fs raise (ValueError 'Malformed StorageGeneration',
    # HttpError, ClientError...) while Orbax writes is a storage fault: one line, exit 4.
    reason = os_error(exc) or fault_reason(exc)
    step = failed_step(exc, self.pending, self.step)
    try:
      # Read back from storage: Orbax lists an async save's step as soon as the save starts,
      # so a failure it reports on the next call would name the failed step as committed.
      self.manager.reload()
      latest = self.manager.latest_step()
    except Exception:  # noqa: BLE001  (the storage may be gone altogether)
      latest = None
    where = f'{self.directory}/{step}' if step is not None else self.directory
    committed = (f'step {latest} in {self.latest_dir}' if latest is not None
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


def failed_step(exc: BaseException, pending: int | None, current: int | None) -> int | None:
  """The step whose write failed: Orbax reports an earlier async save's failure on the next call."""
  for step in (pending, current):
    if step is not None and re.search(rf'/{step}(\.orbax-checkpoint-tmp|/)', str(exc)):
      return step
  return pending if pending is not None else current
