"""Setup: eval runs in train-sized micro-batches, with the same loss as one big batch."""

import jax
import numpy as np

from conftest import load_config
from jaxlm.core import config as config_lib
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import sharding
from jaxlm.data.packing import BATCH_KEYS
from jaxlm.engine.build import Setup, eval_micro_batches


def _setup(grad_accum: int, eval_batch_size: int, devices: int = 2):
  cfg = load_config('tiny')
  cfg.train.batch_size, cfg.train.grad_accum = 8, grad_accum
  cfg.eval.batch_size = eval_batch_size
  cfg.data.seq_len = cfg.model.max_seq_len = 256  # activations large enough to see in XLA's figures
  cfg.mesh.data = devices
  return Setup(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:devices]))


def _batch(rows: int, t: int = 256, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  b = {k: rng.integers(0, 256, (rows, t), dtype=np.int32) for k in ('inputs', 'targets')}
  b['positions'] = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy()
  b['segment_ids'] = np.ones((rows, t), np.int32)
  b['loss_mask'] = (rng.random((rows, t)) > 0.3).astype(np.float32)
  return b


def test_eval_batch_defaults_to_the_train_micro_batch():
  cfg = load_config('tiny')
  cfg.train.batch_size, cfg.train.grad_accum = 8, 4
  assert config_lib.eval_batch_size(cfg) == 2
  cfg.eval.batch_size = 12
  assert config_lib.eval_batch_size(cfg) == 12
  # 12 rows at most 2 per slice on 2 data-parallel devices: 6 slices of 2.
  sizes = {a: 2 if a == 'data' else 1 for a in mesh_lib.MESH_AXES}
  assert eval_micro_batches(cfg, jax.sharding.AbstractMesh(
      tuple(sizes.values()), mesh_lib.MESH_AXES)) == 6


def test_eval_micro_batches_give_the_same_loss_in_less_memory():
  whole, micro = _setup(grad_accum=1, eval_batch_size=8), _setup(grad_accum=4, eval_batch_size=8)
  params = whole.init_state().params
  batches = [_batch(8, seed=s) for s in range(2)]
  np.testing.assert_allclose(micro.eval_loss(params, batches), whole.eval_loss(params, batches),
                             rtol=1e-6)

  def temp(setup):
    spec = {k: jax.ShapeDtypeStruct((8, 256), np.float32 if k == 'loss_mask' else np.int32,
                                    sharding=setup.batch_sharding) for k in BATCH_KEYS}
    with sharding.activate(setup.mesh, setup.rules):
      compiled = setup._eval_step.lower(setup.abstract_state.params, spec).compile()  # noqa: SLF001
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp(micro) < temp(whole) / 2  # 4 slices of 2 rows, one at a time


def test_cpu_steps_leave_only_dots_to_ynnpack_and_sum_without_tree_reductions():
  """On CPU the train and eval steps compile with YNNPACK for dots only, and without XLA's
  TreeReductionRewriter (no reduce-window partial sums; step_compiler_options)."""
  import re  # noqa: PLC0415
  setup = _setup(grad_accum=1, eval_batch_size=8, devices=1)
  spec = {k: jax.ShapeDtypeStruct((8, 256), np.float32 if k == 'loss_mask' else np.int32,
                                  sharding=setup.batch_sharding) for k in BATCH_KEYS}
  with sharding.activate(setup.mesh, setup.rules):
    hlos = [setup._train_step.lower(setup.abstract_state, spec).compile().as_text(),  # noqa: SLF001
            setup._eval_step.lower(setup.abstract_state.params, spec).compile().as_text()]  # noqa: SLF001
  for hlo in hlos:
    ynn = [line for line in hlo.splitlines() if '__ynn_fusion' in line and ' fusion(' in line]
    assert ynn  # the dots still go to YNNPACK
    reductions = [line for line in ynn if re.search(r'op_name="[^"]*/reduce_\w+"', line)]
    assert not reductions, reductions[:3]
    windows = [line for line in hlo.splitlines() if ' reduce-window(' in line]
    assert not windows, windows[:3]
