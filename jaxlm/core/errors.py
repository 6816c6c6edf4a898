"""User-facing errors and exit codes: raised anywhere, printed as one line by the CLI.

Exit codes of ``jaxlm train`` (documented in the README and ``jaxlm train --help``)
let a scheduler or wrapper tell the outcomes apart without reading logs.
"""

EXIT_OK = 0  # reached train.steps
EXIT_BAD_INPUT = 2  # bad config, data path or checkpoint: fix the input, do not retry
EXIT_DIVERGED = 3  # train.max_bad_steps non-finite steps in a row: lower the lr or fix the data
EXIT_STORAGE = 4  # a checkpoint or metrics write failed (no space, permissions, I/O, bucket)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early (SIGTERM/SIGINT/preemption), checkpoint committed

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK:<3} reached train.steps
  {EXIT_PREEMPTED:<3} stopped early by SIGTERM/SIGINT/preemption with a committed checkpoint, or
      (multi-host) another process was lost or a step/eval/save hung: one line names it;
      rerun the same command (every process) to resume (launch/slurm_gpu.sbatch requeues on it)
  {EXIT_BAD_INPUT:<3} bad input: config, data or checkpoint (one 'jaxlm: error:' line)
  {EXIT_DIVERGED:<3} diverged: train.max_bad_steps non-finite steps in a row; nothing bad was saved
  {EXIT_STORAGE:<3} storage fault while saving, uploading metrics or refreshing the lock (no space,
      permission, I/O error, missing bucket, any error of the storage client);
      fix the storage and rerun the same command to resume from the last committed checkpoint
  other: a crash (a bug in jaxlm: the traceback is printed)"""


class JaxlmError(Exception):
  """A problem with the user's input (config, data, checkpoint); no traceback shown."""
  exit_code = EXIT_BAD_INPUT


class ConfigError(JaxlmError):
  """A config key is unknown, mistyped or inconsistent with another."""


class DataError(JaxlmError):
  """A data path is missing, empty or unreadable."""


class CheckpointError(JaxlmError):
  """A checkpoint is missing, partial, corrupt or does not match the model."""


class DivergedError(JaxlmError):
  """Training produced non-finite values it cannot skip past; no bad state was saved."""
  exit_code = EXIT_DIVERGED


class StorageError(JaxlmError):
  """A write to the workdir failed (ENOSPC, EACCES, EIO, a vanished bucket)."""
  exit_code = EXIT_STORAGE


def fault_reason(exc: BaseException) -> str:
  """'ValueError: <its first line>' (cut to 200 characters), for a storage fault's one line."""
  text = str(exc).strip()
  first = text.splitlines()[0][:200] if text else ''
  return f'{type(exc).__name__}: {first}' if first else type(exc).__name__
