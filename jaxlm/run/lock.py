"""One writer per workdir: ``<workdir>/jaxlm.lock``, taken before anything is written.

``train``, ``finetune`` and ``convert --from_hf`` hold it; read-only commands
(eval, generate, convert --to_hf, plan) never look at it. The lock file is
JSON {host, pid, start, heartbeat, token}, created atomically through
jaxlm.core.storage (``O_CREAT|O_EXCL`` locally, create-if-absent on GCS/S3), so of
two starters exactly one wins. The holder refreshes ``heartbeat`` about every
``heartbeat_every`` seconds from the train loop (a hook) and deletes the file
on every exit that runs Python's cleanup (normal end, SIGTERM, divergence,
exceptions). A ``kill -9`` leaves it; the next run takes it over when

  * its PID is gone and it was taken on this host, or
  * its heartbeat is older than ``stale_after`` seconds (any host), or
  * it was taken by an earlier run of the same SLURM job (a requeue), or
  * the user passes ``--force_unlock`` (a run on a host we cannot see).

A second writer while the holder is alive gets a LockError naming the holder
(one ``jaxlm: error:`` line, exit 2) and changes nothing in the workdir.
Multi-host: process 0 takes the lock; every process learns the outcome from a
broadcast before any of them writes.
"""

import datetime
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid

from absl import flags

from jaxlm.core import storage
from jaxlm.core.errors import JaxlmError, StorageError, fault_reason

log = logging.getLogger('jaxlm')
NAME = 'jaxlm.lock'
HEARTBEAT_EVERY = 60.0
STALE_AFTER = 600.0  # a live loop beats every minute; 10 min also covers a slow compile


def define_flags(fv: flags.FlagValues) -> None:
  """Flags of the commands that write a workdir (train, finetune, convert --from_hf)."""
  flags.DEFINE_bool('force_unlock', False,
                    'take the workdir lock even if its holder looks alive (only when you know '
                    'that run is dead, e.g. on a host you cannot see)', flag_values=fv)
  flags.DEFINE_float('lock_timeout', STALE_AFTER,
                     'seconds without a heartbeat after which a workdir lock is stale and '
                     'taken over (the holder beats every ~60 s)', flag_values=fv)


class LockError(JaxlmError):
  """The workdir is held by another live writer."""


def _now() -> float:
  return time.time()


def _iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by another user
  # A killed process whose parent has not reaped it yet is a zombie: it still has a PID
  # but holds nothing (an init that reaps slowly leaves killed trainers so for a while).
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except (OSError, IndexError):
    return True  # no /proc (macOS): the signal check above is all there is


def _missing_dirs(workdir: str) -> list[str]:
  """The local directories from ``workdir`` up that do not exist yet, deepest first."""
  if storage.is_remote(workdir):
    return []  # buckets have no empty directories to leave behind
  out, d = [], os.path.abspath(workdir)
  while not os.path.exists(d) and d != os.path.dirname(d):
    out.append(d)
    d = os.path.dirname(d)
  return out


class WorkdirLock:
  """The lock on one workdir; use as ``with WorkdirLock(workdir) as lock:``."""

  def __init__(self, workdir: str, stale_after: float = STALE_AFTER, force: bool = False,
               heartbeat_every: float = HEARTBEAT_EVERY):
    self.workdir = workdir
    self.path = storage.join(workdir, NAME)
    self.stale_after = stale_after
    self.force = force
    self.heartbeat_every = heartbeat_every
    import jax  # noqa: PLC0415  (the CLI imports this module for its flags; keep that fast)
    self.main = jax.process_index() == 0
    self.multi = jax.process_count() > 1
    self.held = False
    self._info: dict = {}
    self._beat = 0.0

  # ---- taking and giving back --------------------------------------------------------------

  def acquire(self) -> None:
    """Takes the lock (process 0) and makes every process agree; LockError if held."""
    error, failure = '', None
    if self.main:
      try:
        self._acquire()
      except LockError as e:
        error = str(e)
      except Exception as e:  # noqa: BLE001  (e.g. storage down: re-raised below, after the
        failure = e           # broadcast, so the other processes do not wait for it forever)
        error = f'process 0 could not take the workdir lock ({type(e).__name__})'
    if self.multi:
      import numpy as np  # noqa: PLC0415
      from jax.experimental import multihost_utils  # noqa: PLC0415
      ok = multihost_utils.broadcast_one_to_all(np.int32(0 if error else 1))
      if not self.main and not int(ok):
        error = f"workdir '{self.workdir}' is locked by another run (process 0 says why)"
    if failure is not None:
      raise failure
    if error:
      raise LockError(error)

  def _acquire(self) -> None:
    storage.check(self.workdir)
    now = _now()
    self._info = {'host': socket.gethostname(), 'pid': os.getpid(), 'start': now,
                  'heartbeat': now, 'token': uuid.uuid4().hex, **_slurm_job()}
    for _ in range(3):
      if storage.create_exclusive(self.path, self._encode()):
        if self._owner_token() == self._info['token']:
          self.held = True
          self._beat = now
          return
        continue  # someone took it over between our create and read: look again
      holder = self._read()
      if holder is None:
        continue  # released between our create and read
      why = self._takeover_reason(holder)
      if not why:
        raise LockError(
            f"workdir '{self.workdir}' is in use by {_describe(holder)}; wait for it to "
            f'finish, or if it is dead pass --force_unlock (lock file {self.path})')
      log.info('lock: taking over %s from %s (%s)', self.path, _describe(holder), why)
      storage.remove(self.path)
    raise LockError(f"workdir '{self.workdir}': could not take {self.path} (other runs "
                    'keep taking it); try again')

  def _takeover_reason(self, holder: dict) -> str:
    if self.force:
      return '--force_unlock'
    age = _now() - float(holder.get('heartbeat', 0))
    if age > self.stale_after:
      return f'last heartbeat {age:.0f} s ago > {self.stale_after:.0f} s'
    if holder.get('host') == socket.gethostname() and not _pid_alive(int(holder.get('pid', -1))):
      return f"PID {holder.get('pid')} is gone on this host"
    ours = _slurm_job()
    if ours and holder.get('slurm_job') == ours['slurm_job'] and \
        int(holder.get('slurm_restart', 0)) < ours['slurm_restart']:
      return f"an earlier run of SLURM job {ours['slurm_job']} (requeued)"
    return ''

  def release(self) -> None:
    """Deletes the lock if this run still owns it (a storage error is logged, not raised)."""
    if not self.held:
      return
    self.held = False
    try:
      if self._owner_token() == self._info['token']:
        storage.remove(self.path)
    except Exception as e:  # noqa: BLE001  (must not hide the error that ended the run)
      log.info('lock: could not remove %s (%s: %s); the next run will take it over',
               self.path, type(e).__name__, e)

  def __enter__(self):
    self._new_dirs = _missing_dirs(self.workdir)
    self.acquire()
    # A SIGTERM outside the train loop's own handler (e.g. while compiling) would kill
    # the process without cleanup; make it an exit that releases the lock.
    self._old_term = None
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and \
        threading.current_thread() is threading.main_thread():
      self._old_term = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return self

  def __exit__(self, exc_type, *_):
    if self._old_term is not None:
      signal.signal(signal.SIGTERM, self._old_term)
    self.release()
    if exc_type is not None and self.main:
      # A command that failed leaves no directories behind that it made only for its lock.
      for d in self._new_dirs:  # deepest first; stops at the first one something was put in
        try:
          os.rmdir(d)
        except OSError:
          break

  # ---- heartbeat ---------------------------------------------------------------------------

  def heartbeat(self, force: bool = False) -> None:
    """Refreshes the heartbeat if ``heartbeat_every`` seconds have passed (process 0 only)."""
    if not self.held or (not force and _now() - self._beat < self.heartbeat_every):
      return
    try:
      owner = self._owner_token()
      if owner == self._info['token']:
        self._info['heartbeat'] = self._beat = _now()
        storage.path(self.path).write_bytes(self._encode())
    except Exception as e:  # noqa: BLE001  (gcsfs/s3fs raise more than OSError)
      raise StorageError(f'refreshing the workdir lock {self.path} failed: {fault_reason(e)}; '
                         'fix the storage and rerun the same command to resume') from None
    if owner != self._info['token']:
      self.held = False
      raise LockError(f'{self.path} was taken over by {_describe(self._read() or {})} '
                      '(was this run stalled?); stopping without writing more')

  def hook(self):
    """A train-loop hook (every step, cheap unless a beat is due) that keeps the lock fresh."""
    from jaxlm.evals.hooks import Hook  # noqa: PLC0415

    def fn(_ctx):
      self.heartbeat()

    return Hook(fn, every=1, at_end=False, name='workdir_lock')

  # ---- the file ----------------------------------------------------------------------------

  def _encode(self) -> bytes:
    return (json.dumps(self._info, sort_keys=True) + '\n').encode()

  def _read(self) -> dict | None:
    raw = storage.read_bytes_or_none(self.path)
    if raw is None:
      return None
    try:
      return json.loads(raw)
    except json.JSONDecodeError:
      return {}  # a foreign file: only the staleness rule can take it (heartbeat 0)

  def _owner_token(self) -> str:
    return (self._read() or {}).get('token', '')


def _slurm_job() -> dict:
  """{'slurm_job', 'slurm_restart'} inside a SLURM job: a requeued job reuses its id."""
  job = os.environ.get('SLURM_JOB_ID')
  if not job:
    return {}
  return {'slurm_job': job, 'slurm_restart': int(os.environ.get('SLURM_RESTART_COUNT') or 0)}


def _exit_on_sigterm(signum, frame):
  raise SystemExit(128 + signum)


def _describe(holder: dict) -> str:
  if not holder:
    return 'an unknown holder (unreadable lock file)'
  beat = float(holder.get('heartbeat', 0))
  return (f"{holder.get('host', '?')} PID {holder.get('pid', '?')} (started "
          f"{_iso(float(holder.get('start', 0)))}, last heartbeat {_iso(beat)}, "
          f'{max(_now() - beat, 0):.0f} s ago)')
