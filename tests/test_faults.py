"""Pod faults on 127.0.0.1: processes started directly (as on separate hosts), one killed or hung.

Every survivor must exit 75 with one line in bounded time, and a rerun of every
process must resume with the losses of a run that was never interrupted. Each
test prints its goodput figure: seconds from the fault to training again at
the step that was lost (detection + restart + restore + recompile).
Slow (several two-process runs): ``make test-faults``.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults
PEER_TIMEOUT = 15
STEPS = 40


def _port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(repo, workdir, data, extra=(), n=2, log_dir=None, env=None):
  """n `jaxlm train` processes, each told the coordinator directly (no launcher)."""
  env = {**(env or os.environ), 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  port, procs = _port(), []
  for i in range(n):
    cmd = [sys.executable, '-m', 'jaxlm', 'train', '--config=configs/tiny.py',
           f'--workdir={workdir}', f'--config.data.path={data}', '--config.mesh.data=1',
           '--config.mesh.fsdp=8', f'--config.train.steps={STEPS}', '--config.train.log_every=1',
           '--config.checkpoint.every=5', '--config.eval.every=0',
           f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={n}',
           f'--process_id={i}', f'--peer_timeout={PEER_TIMEOUT}', *extra]
    log = open(Path(log_dir or workdir.parent) / f'{workdir.name}.p{i}.log', 'w+')
    procs.append((subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=log), log))
  return procs


def _rows(workdir):
  path = Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _losses(workdir):
  return [(r['step'], r['train/loss']) for r in _rows(workdir) if 'train/loss' in r]


def _committed(workdir):
  d = Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _wait_all(procs, timeout):
  deadline = time.monotonic() + timeout
  for p, _ in procs:
    p.wait(timeout=max(1, deadline - time.monotonic()))
  return [p.returncode for p, _ in procs]


def _log(procs, i):
  f = procs[i][1]
  f.flush()
  f.seek(0)
  return f.read()


def _error_lines(text):
  return [l for l in text.splitlines() if l.startswith('jaxlm: error:')]


@pytest.fixture(scope='module')
def reference(tiny_cfg_module, tmp_path_factory):
  """Losses of an uninterrupted two-process run."""
  from conftest import REPO as repo  # noqa: PLC0415
  work = tmp_path_factory.mktemp('ref') / 'w'
  procs = _start(repo, work, tiny_cfg_module)
  assert _wait_all(procs, 600) == [0, 0], _log(procs, 0)[-3000:]
  return _losses(work)


@pytest.fixture(scope='module')
def tiny_cfg_module(tmp_path_factory):
  from conftest import SHAKESPEARE  # noqa: PLC0415
  data = tmp_path_factory.mktemp('data') / 'text.txt'
  data.write_text(SHAKESPEARE.read_text()[:60_000])
  return data


def _resume_and_time(repo, work, data, lost_step, t_fault, reference, leftovers):
  """Reruns every process; returns seconds from the fault to the lost step trained again."""
  before = len(_rows(work))
  for p, log in leftovers:
    if p.poll() is None:
      p.kill()  # a survivor that failed the bound must not hold the workdir lock
    p.wait()
    log.close()
  procs = _start(repo, work, data, log_dir=work.parent / 'rerun')
  t_back = None
  while t_back is None and all(p.poll() is None for p, _ in procs):
    if any(r.get('step') == lost_step and 'train/loss' in r for r in _rows(work)[before:]):
      t_back = time.monotonic()
    time.sleep(0.05)
  assert _wait_all(procs, 600) == [0, 0], _log(procs, 0)[-3000:]
  t_back = t_back or time.monotonic()
  assert 'resume: restoring step' in _log(procs, 0)
  # The rerun rewrote the steps after the checkpoint: the file holds one run's losses.
  assert _losses(work) == reference
  return t_back - t_fault


@pytest.mark.parametrize('victim', [1, 0], ids=['worker', 'coordinator'])
def test_kill_9_of_one_process_ends_every_survivor_with_75_and_the_rerun_resumes(
    repo, tiny_cfg_module, reference, tmp_path, victim):
  data, work = tiny_cfg_module, tmp_path / 'w'
  (tmp_path / 'rerun').mkdir()
  procs = _start(repo, work, data)
  deadline = time.monotonic() + 300
  while (len(_committed(work)) < 2 or len(_losses(work)) < 12) and time.monotonic() < deadline:
    assert all(p.poll() is None for p, _ in procs), _log(procs, 0)[-3000:]
    time.sleep(0.05)
  lost_step = _losses(work)[-1][0] + 1
  procs[victim][0].send_signal(signal.SIGKILL)
  t_fault = time.monotonic()
  survivor = 1 - victim
  procs[survivor][0].wait(timeout=PEER_TIMEOUT + 30)
  t_exit = time.monotonic() - t_fault
  log = _log(procs, survivor)
  assert procs[survivor][0].returncode == 75, log[-3000:]
  lines = _error_lines(log)
  assert len(lines) == 1, log[-3000:]
  assert 'last committed checkpoint: step ' in lines[0] and 'rerun every process to resume' in lines[0]
  if victim == 1:
    assert 'process 1 (host ' in lines[0] and 'stopped responding' in lines[0]
  assert 'Check failure stack trace' not in log and '    @     0x' not in log
  goodput = _resume_and_time(repo, work, data, lost_step, t_fault, reference, procs)
  print(f'\nfault kill -9 of process {victim}: survivor exited 75 after {t_exit:.1f} s; '
        f'training again at the lost step {lost_step} {goodput:.1f} s after the kill '
        '(rerun started at once)')


HANG_HOOK = """
import threading
import jax


def block_on_1(ctx):
  if jax.process_index() == 1:
    threading.Event().wait()  # a deadlocked hook on one host only
"""


def test_a_hook_hung_on_one_process_ends_both_with_75_and_its_stack(repo, tiny_cfg_module, tmp_path):
  timeout = 25
  (tmp_path / 'hang_hook.py').write_text(HANG_HOOK)
  env = {**os.environ, 'PYTHONPATH': f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
  work = tmp_path / 'w'
  procs = _start(repo, work, tiny_cfg_module, env=env, extra=[
      '--config.eval.hooks=hang_hook:block_on_1', '--config.eval.every=10',
      f'--config.train.step_timeout={timeout}'])
  deadline = time.monotonic() + 300
  while len(_losses(work)) < 10 and time.monotonic() < deadline:
    assert all(p.poll() is None for p, _ in procs), _log(procs, 0)[-3000:]
    time.sleep(0.05)
  t_hang = time.monotonic()  # step 10's hooks start about now
  codes = _wait_all(procs, timeout + 30)
  t_exit = time.monotonic() - t_hang
  logs = [_log(procs, i) for i in range(2)]
  assert codes == [75, 75], logs[1][-3000:]
  for log in logs:
    assert len(_error_lines(log)) == 1, log[-3000:]
  # Whichever timer fires first (process 1's hook, process 0's next step) names its phase.
  named = ' '.join(_error_lines(logs[0]) + _error_lines(logs[1]))
  assert 'hook hang_hook:block_on_1 at step 10 did not finish in' in named or \
      'step 11 did not finish in' in named, named
  assert 'in block_on_1' in logs[1]  # faulthandler's stack of the blocked hook
  assert _committed(work)[-1] == 10
  print(f'\nfault hung hook on process 1: both exited 75 after {t_exit:.1f} s '
        f'(train.step_timeout={timeout})')
