"""The workdir lock: one writer, refused in one line, dead holders taken over, always released.

Cheap checks on a local workdir; the same rules with real training runs (two
concurrent trains, kill -9 then resume, eval/generate during training) and on
gs:// run in tests/cloud/test_workdir_e2e.py (make test-cloud).
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxlm.cli.main import main
from jaxlm.run import lock as lock_lib
from jaxlm.run.lock import LockError, WorkdirLock


def _holder(workdir, **over):
  info = {'host': socket.gethostname(), 'pid': os.getpid(), 'start': time.time(),
          'heartbeat': time.time(), 'token': 'other'}
  info.update(over)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / lock_lib.NAME).write_text(json.dumps(info))
  return info


def _snapshot(workdir):
  return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.iterdir()}


def test_second_train_exits_2_naming_the_holder_and_changes_nothing(tmp_path, capsys, repo):
  work = tmp_path / 'w'
  _holder(work, pid=os.getpid())  # this test process: alive, on this host
  (work / 'config.json').write_text('{}')
  before = _snapshot(work)
  code = main(['train', f'--config={repo}/configs/tiny.py', f'--workdir={work}',
               f'--config.data.path={repo.parent}/shared/data/tinyshakespeare.txt'])
  err = capsys.readouterr().err
  assert code == 2, err
  lines = [l for l in err.splitlines() if l.startswith('jaxlm: error:')]
  assert len(lines) == 1 and 'Traceback' not in err, err
  assert f'PID {os.getpid()}' in lines[0] and socket.gethostname() in lines[0]
  assert 'last heartbeat' in lines[0] and '--force_unlock' in lines[0]
  assert _snapshot(work) == before


def test_dead_pid_on_this_host_is_taken_over_with_a_log_line(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  _holder(tmp_path, pid=dead.pid)
  with caplog.at_level(logging.INFO, logger='jaxlm'):
    with WorkdirLock(str(tmp_path)) as held:
      assert held.held
      assert json.loads((tmp_path / lock_lib.NAME).read_text())['pid'] == os.getpid()
  assert f'PID {dead.pid} is gone on this host' in caplog.text
  assert not (tmp_path / lock_lib.NAME).exists()


def test_other_host_fresh_is_refused_stale_or_forced_is_taken(tmp_path):
  _holder(tmp_path, host='elsewhere', pid=1)
  with pytest.raises(LockError, match='elsewhere PID 1'):
    WorkdirLock(str(tmp_path)).acquire()
  _holder(tmp_path, host='elsewhere', pid=1, heartbeat=time.time() - 120)
  with pytest.raises(LockError):
    WorkdirLock(str(tmp_path), stale_after=300).acquire()
  with WorkdirLock(str(tmp_path), stale_after=60):  # 120 s > 60 s: stale
    pass
  _holder(tmp_path, host='elsewhere', pid=1)
  with WorkdirLock(str(tmp_path), force=True):
    pass


def test_two_starters_exactly_one_wins(tmp_path):
  a, b = WorkdirLock(str(tmp_path)), WorkdirLock(str(tmp_path))
  a.acquire()
  with pytest.raises(LockError, match=f'PID {os.getpid()}'):
    b.acquire()  # same live PID on this host: not taken over
  a.release()
  b.acquire()
  b.release()


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
  held = WorkdirLock(str(tmp_path), heartbeat_every=0.0)
  held.acquire()
  first = json.loads((tmp_path / lock_lib.NAME).read_text())['heartbeat']
  time.sleep(0.01)
  held.heartbeat()
  assert json.loads((tmp_path / lock_lib.NAME).read_text())['heartbeat'] > first
  _holder(tmp_path, host='elsewhere', pid=1)  # someone took it over
  with pytest.raises(LockError, match='taken over by elsewhere'):
    held.heartbeat()
  held.release()
  assert (tmp_path / lock_lib.NAME).exists()  # not ours any more: left alone


def test_released_on_error_and_on_sigterm_outside_the_loop(tmp_path):
  with pytest.raises(RuntimeError):
    with WorkdirLock(str(tmp_path)):
      raise RuntimeError('diverged')
  assert not (tmp_path / lock_lib.NAME).exists()
  code = ('import os, signal, time\nfrom jaxlm.run.lock import WorkdirLock\n'
          f'with WorkdirLock({str(tmp_path)!r}):\n'
          '  print("held", flush=True)\n  for _ in range(600): time.sleep(0.1)\n')
  # Short sleeps: jax's native threads (started by acquire) may take the signal, and then
  # Python runs the handler only when the main thread wakes (one long sleep hung ~1 in 30).
  proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'held'
  assert (tmp_path / lock_lib.NAME).exists()
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(30) == 128 + signal.SIGTERM
  assert not (tmp_path / lock_lib.NAME).exists()


def test_read_only_commands_ignore_the_lock(tmp_path, capsys):
  _holder(tmp_path, pid=os.getpid())
  code = main(['eval', f'--workdir={tmp_path}'])
  err = capsys.readouterr().err
  assert code == 2 and 'no config.json' in err and 'in use by' not in err, err


def test_requeued_slurm_job_takes_over_its_earlier_run(tmp_path, monkeypatch):
  monkeypatch.setenv('SLURM_JOB_ID', '42')
  monkeypatch.setenv('SLURM_RESTART_COUNT', '1')
  _holder(tmp_path, host='node7', pid=1, slurm_job='41', slurm_restart=0)
  with pytest.raises(LockError):  # another job: refused
    WorkdirLock(str(tmp_path)).acquire()
  _holder(tmp_path, host='node7', pid=1, slurm_job='42', slurm_restart=0)
  with WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / lock_lib.NAME).read_text())['slurm_restart'] == 1


@pytest.mark.parametrize('argv', [
    ['convert', '--from_hf={tmp}/hf', '--workdir={work}'],
    ['finetune', '--init_from={tmp}/hf', '--data={tmp}/pairs.jsonl', '--workdir={work}']])
def test_convert_from_hf_and_finetune_are_refused_too(tmp_path, capsys, argv):
  work = tmp_path / 'w'
  _holder(work, pid=os.getpid())
  before = _snapshot(work)
  code = main([a.format(tmp=tmp_path, work=work) for a in argv])
  err = capsys.readouterr().err
  assert code == 2 and f'PID {os.getpid()}' in err and 'Traceback' not in err, err
  assert _snapshot(work) == before


def test_multi_host_processes_agree_through_process_0(tmp_path, monkeypatch):
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  sent = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all',
                      lambda x: sent.append(int(x)) or (x if jax.process_index() == 0 else 0))
  monkeypatch.setattr(jax, 'process_index', lambda: 1)  # a worker: no file I/O, obeys process 0
  with pytest.raises(LockError, match='process 0 says why'):
    WorkdirLock(str(tmp_path)).acquire()
  assert list(tmp_path.iterdir()) == []
  monkeypatch.setattr(jax, 'process_index', lambda: 0)

  def storage_down(*a):
    raise OSError('bucket unreachable')

  monkeypatch.setattr(lock_lib.storage, 'create_exclusive', storage_down)
  with pytest.raises(OSError, match='bucket unreachable'):  # the real error, after the broadcast
    WorkdirLock(str(tmp_path)).acquire()
  assert sent[-1] == 0  # the workers were told to stop too


def test_a_zombie_holds_no_lock():
  # A killed trainer not yet reaped by its parent keeps its PID as a zombie; it must count as gone.
  proc = subprocess.Popen(['sleep', '60'])
  assert lock_lib._pid_alive(proc.pid)
  proc.kill()
  deadline = time.time() + 10
  while _zombie_state(proc.pid) != 'Z' and time.time() < deadline:
    time.sleep(0.01)
  assert not lock_lib._pid_alive(proc.pid)
  proc.wait()


def _zombie_state(pid: int) -> str:
  with open(f'/proc/{pid}/stat', encoding='ascii') as f:
    return f.read().rsplit(')', 1)[1].split()[0]


def test_a_failed_command_leaves_no_new_directories(tmp_path, capsys):
  data = tmp_path / 'nowhere.txt'
  for argv in (['train', '--config=tiny', f'--config.data.path={data}'],
               ['finetune', f'--init_from={tmp_path}', f'--data={data}']):
    work = tmp_path / 'new' / 'runs' / 'w'
    assert main([*argv, f'--workdir={work}']) == 2
    assert 'jaxlm: error:' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even tmp/new
  existing = tmp_path / 'kept'
  existing.mkdir()  # a directory that was there before stays
  assert main(['train', '--config=tiny', f'--config.data.path={data}',
               f'--workdir={existing}']) == 2
  assert existing.is_dir() and not list(existing.iterdir())
