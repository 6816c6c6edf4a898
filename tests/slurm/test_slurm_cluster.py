"""launch/slurm_gpu.sbatch on a real one-node SLURM cluster (make test-slurm; root, minutes).

The fixture starts munged, slurmctld and slurmd (Debian's slurm-wlm, installed
by ``make test-slurm``) with a private slurm.conf for one local node, then
submits the sbatch script as a user would, with 2 tasks x 4 fake CPU devices.
Its loss curve must equal one process with 8 devices (within 1e-4), and each
process must report 4 local devices of 8.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt'
# The node is this host under its own name: the sbatch script makes the first node's
# name the jax coordinator address, so it must resolve (as on a real cluster).
NODE = socket.gethostname().split('.')[0]

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which('slurmctld') or not shutil.which('munged'),
    reason='needs root and slurm-wlm + munge (make test-slurm installs them)')]

CONF = """\
ClusterName=jaxlmtest
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs=4 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
  d = tmp_path_factory.mktemp('slurm')
  for sub in ('state', 'spool'):
    (d / sub).mkdir()
  socket.gethostbyname(NODE)  # fails here, clearly, if this host's name does not resolve
  conf = d / 'slurm.conf'
  conf.write_text(CONF.format(host=socket.gethostname().split('.')[0], node=NODE, d=d,
                              ctld_port=_free_port(), d_port=_free_port()))
  env = dict(os.environ, SLURM_CONF=str(conf))
  started = []
  if not Path('/etc/munge/munge.key').exists():
    subprocess.run(['mungekey', '--create'], check=True)
  Path('/run/munge').mkdir(parents=True, exist_ok=True)
  if subprocess.run(['munge', '-n'], capture_output=True).returncode != 0:
    subprocess.run(['munged', '--force', f'--pid-file={d}/munged.pid'], check=True)
    started.append(d / 'munged.pid')
  subprocess.run(['slurmctld', '-f', str(conf)], check=True, env=env)
  subprocess.run(['slurmd', '-f', str(conf), '-N', NODE], check=True, env=env)
  started += [d / 'slurmctld.pid', d / 'slurmd.pid']
  try:
    deadline = time.time() + 60
    while True:
      state = subprocess.run(['sinfo', '-h', '-N', '-o', '%t'], env=env, capture_output=True,
                             text=True).stdout.strip()
      if state == 'idle':
        break
      assert time.time() < deadline, (state, (d / 'slurmctld.log').read_text()[-2000:],
                                      (d / 'slurmd.log').read_text()[-2000:])
      time.sleep(1)
    yield env, d
  finally:
    # Cancel what is left (a hung job's srun/slurmstepd would outlive the daemons).
    subprocess.run(['scancel', '--full', '--quiet', '--partition=debug'], env=env, check=False)
    time.sleep(2)
    for pid_file in reversed(started):  # slurmd, slurmctld, then munged if we started it
      if pid_file.exists():
        subprocess.run(['kill', pid_file.read_text().strip()], check=False)


def _losses(workdir: Path) -> dict[int, float]:
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def test_sbatch_two_tasks_of_4_devices_match_one_process_of_8(cluster, tmp_path):
  env, d = cluster
  data = tmp_path / 'shakespeare.txt'
  data.write_text(SHAKESPEARE.read_text()[:60_000])
  args = ['--config=tiny', f'--config.data.path={data}', '--config.train.steps=10',
          '--config.train.log_every=2',
          '--config.eval.every=0', '--config.checkpoint.every=0']
  env = dict(env, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), JAXLM=f'{sys.executable} -m jaxlm')

  one = subprocess.run([sys.executable, '-m', 'jaxlm', 'train', *args,
                        f'--workdir={tmp_path}/one'], capture_output=True, text=True,
                       env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=8'),
                       timeout=900)
  assert one.returncode == 0, one.stderr

  out = d / 'job.out'
  job = subprocess.run(
      ['sbatch', '--wait', '--nodes=1', '--ntasks-per-node=2', '--cpus-per-task=1',
       '--gpus-per-node=0', f'--output={out}', '--job-name=jaxlm-test',
       str(REPO / 'launch' / 'slurm_gpu.sbatch'), *args, f'--workdir={tmp_path}/two'],
      cwd=REPO, capture_output=True, text=True, timeout=1200,
      # JAXLM_PORT: a free coordinator port (the script's default derives it from the job
      # id, which is 1 on every fresh test cluster).
      env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAXLM_PORT=str(_free_port())))
  log = out.read_text() if out.exists() else ''
  if job.returncode != 0:
    print(log[-6000:])  # pytest shortens assertion messages
  assert job.returncode == 0, (job.stdout, job.stderr, log[-4000:])
  assert 'jaxlm: 1 nodes, 2 tasks' in log, log[-4000:]
  for p in (0, 1):
    assert f'process {p}/2: 4 local devices, 8 global (cpu)' in log, log[-4000:]
  one_l, two_l = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  # Every log_every (2) steps of 10, and step 1 (the compile step is always logged).
  assert sorted(one_l) == sorted(two_l) == [1, 2, 4, 6, 8, 10], (one_l, two_l)
  diff = max(abs(one_l[s] - two_l[s]) for s in one_l)
  print(f'slurm 2 tasks x 4 devices vs 1 x 8: {len(one_l)} logged steps, max |loss diff| {diff:.2e}')
  assert diff <= 1e-4, (one_l, two_l)
