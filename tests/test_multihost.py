"""Two processes x 4 CPU devices (gloo) train, are killed, resume, and match 1 x 8."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _losses(workdir):
  rows = [json.loads(l) for l in (Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r['train/loss']) for r in rows if 'train/loss' in r]


def _args(workdir, data):
  return ['-m', 'jaxlm', 'train', '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.path={data}', '--config.mesh.data=1', '--config.mesh.fsdp=8',
          '--config.train.log_every=1', '--config.checkpoint.every=5', '--config.eval.every=0']


def _lines(workdir):
  path = Path(workdir) / 'metrics.jsonl'
  return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_session(sid: int) -> None:
  """SIGKILL every process of session ``sid``: the launcher runs each trainer in its own
  process group (job control), so killing the launcher's group alone leaves them running."""
  for stat in Path('/proc').glob('[0-9]*/stat'):
    try:
      fields = stat.read_text().rsplit(')', 1)[1].split()
    except OSError:
      continue  # exited meanwhile
    if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
      try:
        os.kill(int(stat.parent.name), signal.SIGKILL)
      except ProcessLookupError:
        pass


def test_two_processes_match_one_and_resume_after_kill(repo, tiny_cfg, tmp_path):
  data = tiny_cfg.data.path
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  one = tmp_path / 'one'
  subprocess.run([sys.executable, *_args(one, data)], cwd=repo, env=env, check=True,
                 capture_output=True, timeout=300)

  env_mp = {**os.environ, 'XLA_FLAGS': '', 'DEVICES_PER_PROCESS': '4',
            'PATH': f'{Path(sys.executable).parent}:{os.environ["PATH"]}'}
  two = tmp_path / 'two'
  cmd = ['bash', 'launch/local_multiprocess.sh', '2', sys.executable, *_args(two, data)]
  proc = subprocess.Popen(cmd, cwd=repo, env=env_mp, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  deadline = time.time() + 240
  while _lines(two) < 12 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert proc.poll() is None, proc.stdout.read()[-3000:]
  _kill_session(proc.pid)  # every process of the "pod" dies at once
  proc.wait()

  done = subprocess.run(cmd, cwd=repo, env=env_mp, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert 'process 1/2: 4 local devices, 8 global' in done.stdout
  assert 'resume: restoring step' in done.stdout
  reference, got = _losses(one), _losses(two)
  assert [s for s, _ in got] == list(range(1, 21))
  for (_, a), (_, b) in zip(reference, got):
    assert abs(a - b) <= 1e-5 * abs(a), (reference, got)
