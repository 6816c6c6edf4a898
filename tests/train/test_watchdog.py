"""The hang watchdog names the stuck phase, dumps every thread's stack, and scales its limit."""

import threading
import time

from jaxlm.run import watchdog


def _blocked_hook(event):
  event.wait()  # stands in for a deadlocked user hook


def test_a_phase_over_the_limit_dumps_stacks_and_names_it(capfd):
  lines, release = [], threading.Event()
  blocker = threading.Thread(target=_blocked_hook, args=(release,), daemon=True)
  blocker.start()
  with watchdog.Watchdog(0.5, on_hang=lines.append, poll_s=0.05) as watch:
    watch.begin('step 1')
    watch.begin('step 2')
    watch.begin('hook my_hook at step 10', 'eval')
    deadline = time.time() + 10
    while not lines and time.time() < deadline:
      time.sleep(0.05)
  release.set()
  assert len(lines) == 1 and lines[0].startswith('hook my_hook at step 10 did not finish in')
  assert 'train.step_timeout=0.5' in lines[0]
  err = capfd.readouterr().err
  assert 'hook my_hook at step 10 is stuck; the stacks of all threads' in err
  assert 'in _blocked_hook' in err  # the other thread's Python stack


def test_phases_that_finish_in_time_are_not_reported():
  lines = []
  with watchdog.Watchdog(1.0, on_hang=lines.append, poll_s=0.05) as watch:
    for step in range(10):
      watch.begin(f'step {step}')
      time.sleep(0.05)
    watch.end()
    time.sleep(1.3)  # idle (between phases) is never a hang
  assert lines == []


def test_the_automatic_limit_is_generous_and_follows_the_step_time():
  watch = watchdog.Watchdog(-1)
  assert watch.limit('step') == 3 * watchdog.FLOOR_S  # compiles: not measured yet
  watch._steps = [100.0] * watchdog.WINDOW  # a slow model: 100 s steps
  assert watch.limit('step') == 1000.0 and watch.limit('save') == 3000.0
  watch._steps = [0.1] * watchdog.WINDOW
  assert watch.limit('step') == watchdog.FLOOR_S
  explicit = watchdog.Watchdog(20)
  assert explicit.limit('step') == watchdog.FLOOR_S  # the first step: all processes compile
  explicit.begin('step 1')
  explicit.begin('step 2')
  assert explicit.limit('step') == explicit.limit('eval') == 20


def test_time_spent_compiling_does_not_count():
  lines = []
  with watchdog.Watchdog(0.5, on_hang=lines.append, poll_s=0.05) as watch:
    watch.begin('step 1')
    watch.begin('step 2')
    watchdog._on_duration('/jax/core/compile/backend_compile_duration', 5.0)  # as jax reports it
    time.sleep(1.0)
    assert lines == []
    time.sleep(5.0)
  assert lines and lines[0].startswith('step 2 did not finish')


def test_a_preemption_grace_period_that_runs_out_names_the_phase(capfd):
  lines = []
  with watchdog.Watchdog(0, on_hang=lines.append, poll_s=0.05) as watch:  # hang watchdog off
    watch.begin('save: waiting for step 30 to commit', 'save')
    watch.grace(time.monotonic(), 1.0)  # exits at 0.9 s, before the grace runs out
    time.sleep(0.5)
    assert lines == []
    deadline = time.time() + 5
    while not lines and time.time() < deadline:
      time.sleep(0.05)
  assert lines and lines[0].startswith('the preemption grace period (train.preemption_grace=1 s) '
                                       'ran out during save: waiting for step 30 to commit')
  assert 'the stacks of all threads' in capfd.readouterr().err
