"""Hang watchdog: a step, hook or save that never ends stops the run with its stacks and exit 75.

A stuck collective, a wedged data read or a deadlocked hook blocks the train
loop while every heartbeat thread lives on, so nothing else notices. The loop
names what it is doing (``begin('step 12')``, ``begin('save step 20', 'save')``);
a daemon thread checks the time since, and past the limit writes every
thread's Python stack (faulthandler) to stderr and ends the process with exit
75 and one line naming the phase (jaxlm.run.peers.exit_now, which also ends the
other processes of a multi-host run at once).

Time jax spends tracing and compiling (the first step, an eval's first call)
does not count: ``install()`` (run by jaxlm.run.runtime) credits jax's compile
events to the phase they happen in; and the first step, where processes wait
for each other's compiles, gets at least 10 minutes.

``train.step_timeout``: seconds; 0 = off; -1 = automatic: max(10 x the mean
step time, 10 minutes) for steps once 20 have run after the first 5 (the
compile), and three times that (at least 30 minutes) for the first steps,
hooks (evals) and saves.
"""

import faulthandler
import sys
import threading
import time

from jaxlm.run import peers

FLOOR_S = 600.0  # the automatic limit is never below this
WARMUP_STEPS = 5  # steps (compiles) not measured
WINDOW = 20  # steps measured for the automatic limit
_active: 'Watchdog | None' = None  # the watchdog of the run in progress, credited with compiles
_installed = False


def _on_duration(event: str, duration: float, **_) -> None:
  if _active is not None and event.startswith(('/jax/core/compile/', '/jax/compilation_cache/')):
    _active.credit(duration)


def install() -> None:
  """Registers the jax compile-time listener (process-wide; once, from the CLI runtime)."""
  global _installed
  if not _installed:
    import jax  # noqa: PLC0415
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _installed = True


class Watchdog:
  """Times the loop's phases in a daemon thread; ``on_hang(line)`` when one runs too long."""

  def __init__(self, step_timeout: float, on_hang=None, poll_s: float = 1.0):
    self.step_timeout = float(step_timeout)
    self.on_hang = on_hang or peers.exit_now
    self.poll_s = poll_s
    self._phase: tuple[str, str, float] | None = None  # (name, kind, start)
    self._credit = 0.0  # seconds of the current phase spent compiling
    self._grace: tuple[float, float] | None = None  # (deadline, seconds) after a SIGTERM
    self._steps: list[float] = []
    self._seen_steps = 0
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='jaxlm-watchdog', daemon=True)

  def __enter__(self) -> 'Watchdog':
    global _active
    if self.step_timeout != 0:
      self._thread.start()
      _active = self
    return self

  def __exit__(self, *exc) -> None:
    global _active
    self._stop.set()
    if _active is self:
      _active = None

  def grace(self, since: float, seconds: float) -> None:
    """A preemption at ``since`` (monotonic) leaves ``seconds`` until the machine is taken.

    The process then ends a little before (5 s or a tenth, whichever is less) with
    the phase it was in named, rather than be killed without a word.
    """
    if seconds > 0:
      self._grace = (since + seconds - min(5.0, seconds / 10), seconds)
      if not self._thread.is_alive():
        self._thread.start()

  def credit(self, seconds: float) -> None:
    """Excludes ``seconds`` (spent compiling) from the current phase's time."""
    with self._lock:
      self._credit += seconds

  def limit(self, kind: str) -> float:
    """Seconds a phase of ``kind`` ('step', 'eval', 'save') may take."""
    if self.step_timeout > 0:
      # The run's first step is where the processes first meet, each after its own
      # compile (a slow one keeps the others waiting): never less than the floor.
      first = kind == 'step' and self._seen_steps == 0
      return max(self.step_timeout, FLOOR_S) if first else self.step_timeout
    if len(self._steps) < WINDOW:
      return 3 * FLOOR_S
    step = max(10 * sum(self._steps) / len(self._steps), FLOOR_S)
    return step if kind == 'step' else 3 * step

  def begin(self, name: str, kind: str = 'step') -> None:
    """The loop starts phase ``name`` (ending the one before)."""
    now = time.monotonic()
    with self._lock:
      if self._phase is not None and self._phase[1] == 'step':
        self._seen_steps += 1
        if self._seen_steps > WARMUP_STEPS:
          self._steps = (self._steps + [now - self._phase[2] - self._credit])[-WINDOW:]
      self._phase = (name, kind, now)
      self._credit = 0.0

  def end(self) -> None:
    with self._lock:
      self._phase = None

  def _run(self) -> None:
    while not self._stop.wait(self.poll_s):
      with self._lock:
        phase, credit = self._phase, self._credit
      if self._grace is not None and time.monotonic() > self._grace[0]:
        where = phase[0] if phase else 'shutdown'
        self._dump(f'{where} (preempted)')
        self.on_hang(f'the preemption grace period (train.preemption_grace={self._grace[1]:g} '
                     f's) ran out during {where}; the stacks of its threads are above')
        return
      if phase is None or self.step_timeout == 0:
        continue
      name, kind, start = phase
      waited = time.monotonic() - start - credit
      limit = self.limit(kind)
      if waited > limit:
        self._dump(name)
        setting = (f'train.step_timeout={self.step_timeout:g}' if self.step_timeout > 0
                   else 'train.step_timeout=-1: automatic')
        self.on_hang(f'{name} did not finish in {waited:.0f} s ({setting}; '
                     'the stacks of its threads are above)')
        return

  @staticmethod
  def _dump(name: str) -> None:
    sys.stderr.write(f'jaxlm: {name} is stuck; the stacks of all threads:\n')
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
