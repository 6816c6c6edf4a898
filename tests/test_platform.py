"""jaxlm.core.platform: a step's platform comes from its mesh's devices; the choices read it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import platform, sharding
from jaxlm.engine.build import Setup
from jaxlm.model import attention
from jaxlm.model.layers import Dense


def test_platform_comes_from_the_mesh_then_from_building():
  cfg = load_config('tiny')
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  assert platform.of_mesh(mesh) == 'cpu'
  assert [platform.normal(n) for n in ('cuda', 'rocm', 'tpu', 'CPU')] == ['gpu', 'gpu', 'tpu', 'cpu']
  seen = {}

  def probe(x):
    seen['traced'] = platform.current()
    return x

  with platform.building('tpu'):
    assert platform.current() == 'tpu'  # no mesh: what the caller builds for
    with sharding.activate(mesh, sharding.rules_for(cfg.model, cfg.mesh, mesh)):
      jax.jit(probe)(1.0)
  assert seen['traced'] == 'cpu'  # a mesh of CPU devices builds a CPU step


def test_kernel_choice_reads_the_step_platform(monkeypatch):
  monkeypatch.delenv(platform.INTERPRET_ENV, raising=False)
  assert platform.kernel_mode('splash', 'tpu') == 'native'
  assert platform.kernel_mode('pallas_gpu', 'gpu') == 'native'
  assert platform.kernel_mode('splash', 'gpu') is None
  with platform.building('tpu'):  # e.g. init of a step planned for compile-only TPUs
    assert attention._resolve('splash', decode=False) == ('splash', False)
  monkeypatch.setenv(platform.INTERPRET_ENV, '1')
  assert platform.kernel_mode('pallas_gpu', 'cpu') == 'interpret'
  assert platform.kernel_mode('cudnn', 'cpu') is None


def _dense_grad_jaxpr():
  layer = Dense((8,), ('embed',), ('mlp',))
  x = jnp.ones((2, 4, 16))
  params = layer.init(jax.random.key(0), x)
  fn = jax.grad(lambda p, x: layer.apply(p, x).sum(), argnums=(0, 1))
  return str(jax.make_jaxpr(fn)(params, x)), fn(params, x)


def test_dense_backward_is_cpu_tuned_only_on_the_cpu_path():
  cpu_jaxpr, cpu_grads = _dense_grad_jaxpr()
  with platform.accelerator_path():
    acc_jaxpr, acc_grads = _dense_grad_jaxpr()
    assert not platform.cpu_tuned('cpu')
  assert 'optimization_barrier' in cpu_jaxpr
  assert 'optimization_barrier' not in acc_jaxpr  # autodiff's backward, as on GPU/TPU
  for a, b in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(acc_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize('forced', [False, True])
def test_compiler_options_follow_the_setup_platform(forced):
  cfg = load_config('tiny')
  cfg.mesh.data = 1
  if forced:
    with platform.accelerator_path():
      setup = Setup(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))
      opts = platform.step_compiler_options(setup.platform)
  else:
    setup = Setup(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))
    opts = platform.step_compiler_options(setup.platform)
  assert setup.platform == 'cpu'
  assert bool(opts) is not forced
  assert platform.step_compiler_options('tpu') == platform.init_compiler_options('gpu') == {}
