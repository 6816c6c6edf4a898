"""Compiles for TPUs and NVIDIA GPUs on this CPU host with their own compilers (make test-aot).

Needs the aot extras (libtpu; the CUDA PJRT plugin), which make test-aot installs in its
own venv (.venv-aot): they would change the default backend of the plain test venv.
Compile only; nothing runs.
"""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from jaxlm.cli import plan as plan_lib
from jaxlm.cli import targets
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import platform, sharding
from jaxlm.data.packing import BATCH_KEYS
from jaxlm.engine.build import Setup

pytestmark = pytest.mark.aot

TPU = targets.parse('v5p-8')  # 4 chips
GPU = targets.parse('h100-80g', 8)


@pytest.fixture(scope='module', autouse=True)
def _compilers():
  for t in (TPU, GPU):
    if targets.compiler_version(t.platform) is None:
      pytest.fail(f"{targets.missing(t)} (make test-aot installs it)")


def _compile(cfg, target):
  devices = targets.compile_only_devices(target)
  setup = Setup(cfg, mesh_lib.make_mesh(cfg.mesh, devices))
  compiled = setup.compile_train_step()
  return setup, compiled


def _plan(*args):
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  out = subprocess.run([sys.executable, '-m', 'jaxlm', 'plan', *args], capture_output=True,
                       text=True, env=env, cwd=REPO, check=False, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.parametrize('target,name', [('v5p-8', 'TPU compiler, libtpu '),
                                         ('h100-80g', 'XLA:GPU compiler, jax-cuda12-pjrt ')])
def test_plan_compiles_with_the_target_compiler_and_names_it(target, name):
  out = _plan('--config=tiny', f'--target={target}', '--config.mesh.data=1',
              '--config.mesh.fsdp=-1')
  assert 'stand-in' not in out and 'XLA:CPU' not in out, out
  assert f'compiler    {name}' in out, out
  compiled = [l for l in out.splitlines() if l.startswith('compiled')]
  assert compiled and compiled[0].endswith('fits') and f"({name.split(',')[0]})" in compiled[0]
  traffic = [l for l in out.splitlines() if l.startswith('collectives per device per step')]
  assert traffic and 'all-gather' in traffic[0], out  # fsdp gathers the params


def test_collective_bytes_scale_with_grad_accum_on_the_tpu_compiler():
  """FSDP all-gathers inside the accumulation loop run once per micro-batch; libtpu writes no
  trip counts, so this checks the loop bounds read from the loop conditions."""
  got = {}
  for ga in (1, 2):
    cfg = load_config('tiny')
    cfg.mesh.data, cfg.mesh.fsdp, cfg.train.grad_accum, cfg.train.batch_size = 1, -1, ga, 16
    got[ga] = plan_lib.figures(cfg, mesh_lib.make_mesh(cfg.mesh, targets.compile_only_devices(
        TPU)))['collectives']
  assert got[1]['all-gather'] > 0
  assert 1.5 * got[1]['all-gather'] < got[2]['all-gather'] <= 2 * got[1]['all-gather'], got


def test_multislice_mesh_puts_the_dcn_pipeline_across_slices():
  """llama_405b's mesh on 2 x v5p-512: its ICI axes (fsdp 16, tensor 4, sequence 4) do not
  each match a physical axis of a 4x8x8 slice, so the hybrid mesh must split them."""
  cfg = load_config('llama_405b')
  mesh = mesh_lib.make_mesh(cfg.mesh, targets.compile_only_devices(targets.parse('v5p-512', 0, 2)))
  assert dict(mesh.shape) == {'pipeline': 2, 'data': 1, 'fsdp': 16, 'expert': 1, 'tensor': 4,
                              'sequence': 4}
  for stage in range(2):
    assert {d.slice_index for d in mesh.devices[stage].flat} == {stage}


KERNELS = [('splash', TPU, 'tpu_custom_call'), ('chunked', TPU, None),
           ('pallas_gpu', GPU, '__gpu$xla.gpu.triton'), ('chunked', GPU, None)]


@pytest.mark.parametrize('remat', ['none', 'full', 'dots', 'minimal'])
@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'loop'])
@pytest.mark.parametrize('kernel,target,marker', KERNELS,
                         ids=[f'{k}-{t.platform}' for k, t, _ in KERNELS])
def test_kernel_compiles_natively_under_scan_and_remat(kernel, target, marker, scan, remat):
  """Each attention kernel in a train step for its platform, every scan x remat: splash as
  Mosaic kernels, pallas_gpu as Triton (splash + scan + remat none leaked a tracer)."""
  cfg = load_config('tiny')
  cfg.model.attention, cfg.model.scan_layers, cfg.model.remat = kernel, scan, remat
  cfg.model.dtype = 'bfloat16'
  cfg.model.max_seq_len = cfg.data.seq_len = 256
  cfg.mesh.data = -1
  setup, compiled = _compile(cfg, target)
  assert setup.platform == target.platform
  hlo = compiled.as_text()
  if marker:
    assert marker in hlo, f'{kernel} did not compile as a native kernel'
  assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.parametrize('target', [TPU, GPU], ids=['tpu', 'gpu'])
@pytest.mark.parametrize('scan,remat', [(True, 'none'), (True, 'full'), (False, 'minimal')])
def test_moe_ragged_dot_and_expert_all_to_all_compile(target, scan, remat):
  cfg = load_config('tiny_moe')
  cfg.model.scan_layers, cfg.model.remat, cfg.model.dtype = scan, remat, 'bfloat16'
  cfg.mesh.data, cfg.mesh.expert = 1, target.devices
  _, compiled = _compile(cfg, target)
  hlo = compiled.as_text()
  assert re.search(r'all-to-all', hlo), 'expert parallelism exchanges no tokens'


RECIPES = ['gpt2_small', 'gpt2_medium', 'llama_1b', 'llama_8b', 'mixtral_8x7b', 'llama_70b']


@pytest.mark.parametrize('name', RECIPES)
def test_shipped_recipe_fits_its_documented_target_by_its_compiler(name):
  """The recipe as shipped (mesh, batch, grad_accum, remat) on the hardware its docstring
  names, compiled by that hardware's compiler: at most 90% of HBM per device."""
  from test_configs import documented_target  # noqa: PLC0415
  want = documented_target(f'{name}.py')
  target = targets.parse(want['target'], int(want.get('devices', 0)), int(want.get('slices', 1)))
  cfg = load_config(name)
  cfg.data.path = '/data/train'
  mesh = mesh_lib.make_mesh(cfg.mesh, targets.compile_only_devices(target))
  fig = plan_lib.figures(cfg, mesh)
  assert plan_lib.compiler_label(mesh, target).startswith(('TPU compiler', 'XLA:GPU compiler'))
  print(f"{name} on {target.name}: {fig['total'] / 2**30:.2f} GiB per device "
        f"({plan_lib.compiler_label(mesh, target)})")
  assert fig['total'] <= plan_lib.USABLE * target.hbm, (name, fig['total'] / 2**30)
