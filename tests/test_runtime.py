"""jaxlm.run.runtime: which jax.distributed.initialize call each cluster gets, and the compile cache."""

import os
import subprocess
import sys

import jax
import pytest

from jaxlm.run import runtime


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of joining a cluster."""
  seen = []
  monkeypatch.setattr(runtime, '_initialized', False)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **kw: seen.append((a, kw)))
  monkeypatch.setattr(jax.config, 'update', lambda *a: None)
  for var in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', 'SLURM_NNODES',
              'SLURM_STEP_NUM_NODES', 'CUDA_VISIBLE_DEVICES', 'SLURM_GPUS_ON_NODE',
              'JAXLM_COORDINATOR_ADDRESS', 'JAXLM_NUM_PROCESSES', 'JAXLM_PROCESS_ID'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(runtime, 'on_cloud_tpu_vm', lambda: False)
  return seen


def _slurm(monkeypatch, tasks, nodes, gpus='0,1,2,3,4,5,6,7'):
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', str(tasks))
  monkeypatch.setenv('SLURM_STEP_NUM_NODES', str(nodes))
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', gpus)


def test_slurm_one_task_per_node_gets_all_gpus(calls, monkeypatch):
  _slurm(monkeypatch, tasks=2, nodes=2)
  runtime.initialize()
  assert calls == [((), {'local_device_ids': list(range(8))})]


def test_slurm_one_task_per_gpu_keeps_jax_default(calls, monkeypatch):
  _slurm(monkeypatch, tasks=16, nodes=2, gpus='0,1,2,3,4,5,6,7')
  runtime.initialize()
  assert calls == [((), {'local_device_ids': None})]  # jax picks GPU SLURM_LOCALID


def test_explicit_coordinator_under_slurm_still_gets_all_gpus(calls, monkeypatch):
  _slurm(monkeypatch, tasks=2, nodes=2, gpus='0,1,2,3')
  runtime.initialize('head:1234', 2, 1)
  assert calls == [(('head:1234', 2, 1), {'local_device_ids': [0, 1, 2, 3]})]


def test_cloud_tpu_vm_always_initializes_without_arguments(calls, monkeypatch):
  monkeypatch.setattr(runtime, 'on_cloud_tpu_vm', lambda: True)
  runtime.initialize()
  assert calls == [((), {})]


def test_single_process_does_not_initialize(calls):
  runtime.initialize()
  assert calls == []


def test_compilation_cache_on_by_default_and_user_setting_wins(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    runtime.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / '.cache' / 'jaxlm' / 'xla')
    jax.config.update('jax_compilation_cache_dir', '/elsewhere')  # JAX_COMPILATION_CACHE_DIR
    runtime.enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == '/elsewhere'
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


def test_train_flags_and_env_vars_reach_jax_distributed(calls, monkeypatch, capsys):
  """`jaxlm train --coordinator_address=H:P --num_processes=N --process_id=I` (or the
  JAXLM_* variables) is what jax.distributed.initialize is called with."""
  from jaxlm.cli import main as cli  # noqa: PLC0415
  from jaxlm.core.errors import ConfigError  # noqa: PLC0415
  from jaxlm.run import supervise  # noqa: PLC0415

  def stop_after_recording(*a, **kw):
    calls.append((a, kw))
    raise ConfigError('recorded')  # the test ends here, before any training

  monkeypatch.setattr(jax.distributed, 'initialize', stop_after_recording)
  # In-process: the supervisor (jaxlm.run.supervise) would run train in a child this patch misses.
  monkeypatch.setenv(supervise.ENV_FLAG, '1')
  argv = ['train', '--config=tiny', '--workdir=/nonexistent/w']
  assert cli.main([*argv, '--coordinator_address=10.0.0.1:8476', '--num_processes=4',
                   '--process_id=3']) == 2
  assert 'recorded' in capsys.readouterr().err
  monkeypatch.setattr(runtime, '_initialized', False)
  monkeypatch.setenv('JAXLM_COORDINATOR_ADDRESS', '10.0.0.2:8476')
  monkeypatch.setenv('JAXLM_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAXLM_PROCESS_ID', '1')
  assert cli.main(argv) == 2
  # jax's own heartbeat timeout sits 30 s past --peer_timeout (60): jaxlm.run.peers names the lost
  # process first.
  kw = {'local_device_ids': None, 'heartbeat_timeout_seconds': 90}
  assert calls == [(('10.0.0.1:8476', 4, 3), kw), (('10.0.0.2:8476', 2, 1), kw)]


@pytest.fixture
def platforms():
  """Sets jax_platforms for one test, restoring it after."""
  old = jax.config.jax_platforms
  yield lambda value: jax.config.update('jax_platforms', value)
  jax.config.update('jax_platforms', old)


def test_cpu_only_follows_jax_platforms_then_installed_accelerator_plugins(platforms, monkeypatch):
  platforms('cpu')
  assert runtime.cpu_only()
  platforms('cuda,cpu')
  assert not runtime.cpu_only()
  platforms('')  # unset: whatever is installed decides
  monkeypatch.setattr(runtime.importlib.metadata, 'entry_points', lambda group: [])
  real_find = runtime.importlib.util.find_spec
  monkeypatch.setattr(runtime.importlib.util, 'find_spec',
                      lambda name: None if name in ('jax_plugins', 'libtpu') else real_find(name))
  assert runtime.cpu_only()
  monkeypatch.setattr(runtime.importlib.util, 'find_spec',
                      lambda name: object() if name == 'libtpu' else None)
  assert not runtime.cpu_only()


# A fresh CPU process as `jaxlm train` starts one (initialize(), then Setup): the
# page faults of each train step at nanoGPT's CPU shape, whose XLA temporary buffer
# (47 MiB) is over glibc's 32 MB mmap limit. Prints the buffer's pages, then each step's faults.
_FAULTS = r'''
import resource
import jax, numpy as np
from jaxlm import configs
from jaxlm.run import runtime
runtime.initialize()
from jaxlm.engine.build import Setup
cfg = configs.load('shakespeare_char_nanogpt')
setup = Setup(cfg)
temp = setup.train_step_memory().temp_size_in_bytes
assert temp > 32 * 2**20
toks = np.random.default_rng(0).integers(0, 256, (12, 65), dtype=np.int32)
batch = setup.device_batch({'inputs': toks[:, :-1], 'targets': toks[:, 1:],
                            'segment_ids': np.ones((12, 64), np.int32),
                            'positions': np.tile(np.arange(64, dtype=np.int32), (12, 1)),
                            'loss_mask': np.ones((12, 64), np.float32)})
state = setup.init_state()
faults = []
for _ in range(STEPS):
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  state, _ = setup.train_step(state, batch)
  jax.block_until_ready(state)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(temp // resource.getpagesize(), *faults)
'''


def test_cpu_train_steps_reuse_their_temporary_buffer_without_page_faults():
  """Without reuse_host_memory every step maps its temp buffer afresh: ~10,500 faults each.

  With it, a few early steps still grow the heap by one temp buffer (why: the docstring of
  reuse_host_memory); measured 2026-11-29, 0-3 of steps 2-17 in a fresh process. Every other
  step faults ~0 pages.
  """
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  out = subprocess.run([sys.executable, '-c', _FAULTS.replace('STEPS', '18')], env=env,
                       capture_output=True, text=True, timeout=300, check=True).stdout
  pages, *faults = map(int, out.split())
  faults = faults[2:]  # step 0 maps the heap's first temp; step 1 often a second
  fresh = [f for f in faults if f >= pages // 2]  # steps whose temp the heap grew for
  assert len(fresh) <= 4 and all(f < 500 for f in faults if f < pages // 2), (pages, faults)
