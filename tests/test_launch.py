"""launch/ scripts parse, pass shellcheck, and local_multiprocess.sh behaves as documented."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / 'launch'
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in ('.sh', '.sbatch'))


def run(*cmd, timeout=30):
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def test_scripts_exist():
  names = {p.name for p in SCRIPTS}
  assert {'gpu_single_host.sh', 'tpu_pod.sh', 'slurm_gpu.sbatch', 'local_multiprocess.sh'} <= names


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  out = run('bash', '-n', str(script))
  assert out.returncode == 0, out.stderr


def linter(name: str) -> str:
  """Path of a linter binary from the test extra (next to this Python, or on PATH)."""
  found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
  assert found, f"{name} is not installed: pip install -e '.[test]' provides it"
  return found


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  out = run(linter('shellcheck'), '--shell=bash', str(script))
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_usage_block_and_executable(script):
  assert 'Usage' in script.read_text().split('set -euo pipefail')[0]
  assert script.stat().st_mode & 0o111, f'{script.name} is not executable'


def test_local_multiprocess_env_and_prefixes():
  show = 'echo "$JAXLM_PROCESS_ID/$JAXLM_NUM_PROCESSES $JAXLM_COORDINATOR_ADDRESS $JAX_PLATFORMS $XLA_FLAGS"'
  out = run(str(LAUNCH / 'local_multiprocess.sh'), '3', 'bash', '-c', show)
  assert out.returncode == 0, out.stderr
  lines = sorted(out.stdout.splitlines())
  assert [line.split()[0] for line in lines] == ['[p0]', '[p1]', '[p2]']
  assert [line.split()[1] for line in lines] == ['0/3', '1/3', '2/3']
  assert len({line.split()[2] for line in lines}) == 1  # one coordinator address
  assert all(line.split()[2].startswith('127.0.0.1:') for line in lines)
  assert all('cpu --xla_force_host_platform_device_count=4' in line for line in lines)


def test_local_multiprocess_failure_stops_the_rest():
  fail_one = 'if [ "$JAXLM_PROCESS_ID" = 1 ]; then exit 3; fi; sleep 60'
  start = time.monotonic()
  out = run(str(LAUNCH / 'local_multiprocess.sh'), '3', 'bash', '-c', fail_one)
  assert out.returncode == 3
  assert time.monotonic() - start < 20, 'the sleeping processes were not stopped'
  # Each process's own status: 3, and the others ended by the SIGTERM sent to them (143).
  assert 'local_multiprocess: exit status p0=143 p1=3 p2=143' in out.stderr, out.stderr


def test_local_multiprocess_usage_error():
  out = run(str(LAUNCH / 'local_multiprocess.sh'))
  assert out.returncode == 2 and 'Usage' in out.stderr


def test_gpu_single_host_print_env_and_user_xla_flags_last(tmp_path):
  """--print-env exports the launch settings; the user's XLA_FLAGS come after ours (last wins)."""
  env = {'PATH': os.environ['PATH'], 'HOME': str(tmp_path), 'NCCL_DEBUG': 'INFO',
         'XLA_FLAGS': '--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/hlo'}
  script = LAUNCH / 'gpu_single_host.sh'
  show = f'eval "$({script} --print-env)"; printf "%s\\n" "$XLA_FLAGS" "$NCCL_DEBUG" "$JAX_COMPILATION_CACHE_DIR"'
  out = subprocess.run(['bash', '-c', show], env=env, capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  flags, nccl, cache = out.stdout.splitlines()
  flags = flags.split()
  assert flags[-2:] == ['--xla_gpu_enable_triton_gemm=true', '--xla_dump_to=/tmp/hlo']
  assert flags.index('--xla_gpu_enable_triton_gemm=false') < flags.index('--xla_gpu_enable_triton_gemm=true')
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in flags
  assert nccl == 'INFO'  # a user's setting is kept
  assert cache == f'{tmp_path}/.cache/jaxlm/xla'

  # Without --print-env it runs `$JAXLM train <args>` with the same environment.
  fake = tmp_path / 'fake_jaxlm'
  fake.write_text('#!/usr/bin/env bash\necho "args: $*"\necho "flags: $XLA_FLAGS"\n')
  fake.chmod(0o755)
  out = subprocess.run([str(script), '--config=tiny', '--workdir=w'], env={**env, 'JAXLM': str(fake)},
                       capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[0] == 'args: train --config=tiny --workdir=w'
  assert out.stdout.splitlines()[1].endswith('--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/hlo')


def _fake_jaxlm(tmp_path):
  fake = tmp_path / 'jaxlm'
  fake.write_text('#!/usr/bin/env bash\necho "XLA_FLAGS=$XLA_FLAGS"\n'
                  'echo "LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS"\necho "ARGS=$*"\n')
  fake.chmod(0o755)
  return fake


@pytest.mark.parametrize('script,var,flag', [
    ('gpu_single_host.sh', 'XLA_FLAGS', '--xla_gpu_enable_latency_hiding_scheduler=true'),
    ('tpu_host.sh', 'LIBTPU_INIT_ARGS', '--xla_tpu_enable_async_collective_fusion=true')])
def test_host_scripts_set_flags_and_pass_any_command(tmp_path, monkeypatch, script, var, flag):
  monkeypatch.setenv('JAXLM', str(_fake_jaxlm(tmp_path)))
  monkeypatch.setenv(var, '--mine=1')
  out = run(str(LAUNCH / script), 'eval', '--workdir=w').stdout.splitlines()
  assert f'{var}=' in out[0 if var == 'XLA_FLAGS' else 1]
  line = next(l for l in out if l.startswith(f'{var}='))
  assert flag in line and line.endswith('--mine=1')  # the user's flags come last and win
  assert out[-1] == 'ARGS=eval --workdir=w'
  out = run(str(LAUNCH / script), '--config=tiny').stdout.splitlines()
  assert out[-1] == 'ARGS=train --config=tiny'  # bare flags mean `jaxlm train`


@pytest.mark.parametrize('dockerfile,script', [('Dockerfile.gpu', 'gpu_single_host.sh'),
                                                ('Dockerfile.tpu', 'tpu_host.sh')])
def test_docker_entrypoint_is_the_launch_script(dockerfile, script):
  text = (LAUNCH.parent / 'docker' / dockerfile).read_text()
  entry = [l for l in text.splitlines() if l.startswith('ENTRYPOINT')]
  assert entry == [f'ENTRYPOINT ["/opt/jaxlm/launch/{script}"]']
  assert 'COPY launch ./launch' in text and 'WORKDIR /opt/jaxlm' in text


def _fake_slurm(tmp_path, srun_body):
  """A PATH with stub srun/scontrol; scontrol appends its arguments to calls.txt."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(f'#!/usr/bin/env bash\n{srun_body}\n')
  (bin_dir / 'scontrol').write_text(
      '#!/usr/bin/env bash\n'
      f'echo "$*" >> {tmp_path}/calls.txt\n'
      'if [ "$1" = show ]; then echo node1; fi\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'SLURM_JOB_ID': '77', 'SLURM_NNODES': '1', 'SLURM_NTASKS': '1',
         'SLURM_JOB_NODELIST': 'node1'}
  return env


@pytest.mark.parametrize('code, requeued', [(75, True), (0, False), (3, False), (4, False)])
def test_slurm_script_requeues_only_on_75(tmp_path, code, requeued):
  env = _fake_slurm(tmp_path, f'exit {code}')
  out = subprocess.run(['bash', str(LAUNCH / 'slurm_gpu.sbatch'), '--config=tiny'], env=env,
                       capture_output=True, text=True, timeout=30, check=False)
  assert out.returncode == code, out.stderr
  calls = (tmp_path / 'calls.txt').read_text()
  assert ('requeue 77' in calls) == requeued, calls


def test_slurm_script_passes_sigterm_on_and_requeues(tmp_path):
  # The stub stands in for jaxlm: on SIGTERM it "saves" and exits 75.
  env = _fake_slurm(tmp_path, f'trap "touch {tmp_path}/got_term; exit 75" TERM\n'
                              f'touch {tmp_path}/started\nsleep 30 >/dev/null 2>&1 & wait')
  proc = subprocess.Popen(['bash', str(LAUNCH / 'slurm_gpu.sbatch')], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 20
  while not (tmp_path / 'started').exists() and time.monotonic() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=20)
  assert proc.returncode == 75, err
  assert (tmp_path / 'got_term').exists()
  assert 'requeue 77' in (tmp_path / 'calls.txt').read_text()
