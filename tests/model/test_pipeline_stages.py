"""Pipeline parallelism on 8 fake CPU devices: every stage layout trains the one-device run."""

import json

import jax
import numpy as np
import pytest
from flax import linen as nn

from conftest import SHAKESPEARE, load_config, train_and_collect
from jaxlm.cli import collectives
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import sharding
from jaxlm.core.errors import ConfigError
from jaxlm.engine import build as engine
from jaxlm.model import pipeline
from jaxlm.model.transformer import build_model
from jaxlm.optim.step import objective_sums

STEPS = 4
# name: (mesh fields, model fields)
LAYOUTS = {
    'pipeline=4,repeats=2': (dict(pipeline=4), dict(pipeline_repeats=2)),
    'pipeline=2,fsdp=2,tensor=2': (dict(pipeline=2, fsdp=2, tensor=2), {}),
    'dcn_pipeline=2,fsdp=4': (dict(dcn_pipeline=2, fsdp=4), {}),
}
# Covered above at lower cost (circular 4-stage and 2-stage + fsdp/tensor); each alone here.
SLOW_LAYOUTS = {
    'pipeline=2': (dict(pipeline=2), {}),
    'pipeline=4': (dict(pipeline=4), {}),
    'pipeline=2,repeats=2': (dict(pipeline=2), dict(pipeline_repeats=2)),
}


def _docs(tmp_path):
  """Short JSONL documents: every packed window holds several (segment ids, restarts)."""
  lines = [l for l in SHAKESPEARE.read_text()[:40_000].splitlines() if l.strip()]
  path = tmp_path / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'text': '\n'.join(lines[i:i + 2])}) + '\n'
                          for i in range(0, len(lines), 2)))
  return str(path)


def _cfg(path, moe=False, mesh=None, model=None, steps=STEPS):
  cfg = load_config('tiny')
  cfg.data.source, cfg.data.path = 'jsonl', path
  m = cfg.model
  # Llama-style with GQA and full remat.
  m.position, m.norm, m.activation, m.use_bias, m.tie_embeddings = (
      'rope', 'rmsnorm', 'swiglu', False, False)
  m.n_layers, m.n_kv_heads, m.remat = 8, 2, 'full'
  if moe:  # 4 blocks, every other one MoE: 2 scanned groups, one per stage
    m.n_layers, m.moe_experts, m.moe_every = 4, 4, 2
  for k, v in (model or {}).items():
    m[k] = v
  cfg.mesh.data = -1
  for k, v in (mesh or {}).items():
    cfg.mesh[k] = v
  cfg.train.steps = steps
  cfg.optim.decay_steps = 2 * STEPS  # fixed horizon: a resumed leg keeps the lr curve
  cfg.train.log_every = 1
  cfg.eval.every = 0
  cfg.checkpoint.every = 0  # the final checkpoint is still written
  return cfg


def _assert_same_run(got, want):
  assert len(got['loss']) == len(want['loss'])
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-4)
  np.testing.assert_allclose(got['grad_norm'], want['grad_norm'], rtol=1e-4)
  assert jax.tree.structure(got['params']) == jax.tree.structure(want['params'])
  flat = jax.tree_util.tree_flatten_with_path(want['params'])[0]
  for (path, w), g in zip(flat, jax.tree.leaves(got['params'])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return _docs(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def reference(corpus, tmp_path_factory):
  """The one-device runs, dense and MoE."""
  return {moe: train_and_collect(_cfg(corpus, moe), tmp_path_factory.mktemp('one'), jax.devices()[:1])
          for moe in (False, True)}


def test_schedule_runs_every_micro_batch_once_per_pass_in_stage_order():
  for stages, micro, repeats in ((2, 2, 1), (4, 4, 2), (2, 5, 3)):
    work = pipeline.schedule(stages, micro, repeats)
    assert work.shape == (micro * repeats + stages - 1, stages)
    for s in range(stages):
      col = work[:, s]
      assert list(col[col >= 0]) == list(range(micro * repeats))  # each once, in order
    # A work item moves to the next stage the next iteration (the rotation).
    t, s = np.nonzero(work[:-1, :-1] >= 0)
    assert (work[t + 1, s + 1] == work[t, s]).all()
    # Pass r of micro-batch i starts only after pass r - 1 left the last stage.
    done = {w: t for t, w in enumerate(work[:, -1]) if w >= 0}
    for t, w in enumerate(work[:, 0]):
      if w >= micro:
        assert done[w - micro] < t
  assert pipeline.bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)


@pytest.mark.parametrize('name', LAYOUTS)
def test_pipeline_matches_single_device(name, corpus, reference, tmp_path):
  mesh, model = LAYOUTS[name]
  _assert_same_run(train_and_collect(_cfg(corpus, mesh=mesh, model=model), tmp_path / 'w'), reference[False])


@pytest.mark.slow
@pytest.mark.parametrize('name', SLOW_LAYOUTS)
def test_pipeline_matches_single_device_slow(name, corpus, reference, tmp_path):
  mesh, model = SLOW_LAYOUTS[name]
  _assert_same_run(train_and_collect(_cfg(corpus, mesh=mesh, model=model), tmp_path / 'w'), reference[False])


def test_moe_pipeline_matches_single_device(corpus, reference, tmp_path):
  # The router's balance and z-losses are whole-batch values, as on one device.
  got = train_and_collect(_cfg(corpus, moe=True, mesh=dict(pipeline=2, fsdp=2)), tmp_path / 'w')
  _assert_same_run(got, reference[True])


def test_resume_across_pipeline_degrees(corpus, reference, tmp_path):
  """pipeline=4 -> pipeline=1 -> pipeline=4 legs continue the one-device curve."""
  w = tmp_path / 'w'
  for steps, stages in ((STEPS - 2, 4), (STEPS - 1, 1), (STEPS, 4)):
    got = train_and_collect(_cfg(corpus, mesh=dict(pipeline=stages), steps=steps), w)
  _assert_same_run(got, reference[False])


def _features(cfg, devices, batch, compiled=False):
  """Final hidden states [batch, length, embed] of a freshly initialised model (or, with
  ``compiled``, the compiled computation's HLO text)."""
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  model = build_model(cfg.model)
  params = nn.unbox(model.init(jax.random.key(0), batch['inputs'][:1])['params'])
  fn = jax.jit(lambda p: model.apply({'params': p}, batch['inputs'], batch['positions'],
                                     batch['segment_ids'], method='features')[0])
  with sharding.activate(mesh, sharding.rules_for(cfg.model, cfg.mesh, mesh)):
    return fn.lower(params).compile().as_text() if compiled else np.asarray(fn(params))


def _packed_batch(rows=8, length=32):
  r = np.random.RandomState(0)
  half = length // 2
  return {'inputs': r.randint(0, 256, (rows, length)).astype(np.int32),
          'targets': r.randint(0, 256, (rows, length)).astype(np.int32),
          'segment_ids': np.repeat([[1] * half + [2] * half], rows, 0).astype(np.int32),
          'positions': np.tile(np.r_[np.arange(half), np.arange(half)], (rows, 1)).astype(np.int32),
          'loss_mask': np.ones((rows, length), np.float32)}


_SCHEDULE = pipeline.schedule


def _skip(stages, micro, repeats):  # the first micro-batch never enters stage 0
  work = _SCHEDULE(stages, micro, repeats)
  work[work == 0] = 1
  return work


def _repeat(stages, micro, repeats):  # micro-batch 1 runs twice, micro-batch 0 never
  work = _SCHEDULE(stages, micro, repeats)
  work[work == 1] = 0
  return work


@pytest.fixture(scope='module')
def circular():
  """A 4-layer model on 2 stages x 2 repeats, a packed batch, and its one-device features."""
  cfg = _cfg('', model=dict(pipeline_repeats=2))
  cfg.model.n_layers = 4
  batch = _packed_batch()
  want = _features(cfg, jax.devices()[:1], batch)
  cfg.mesh.pipeline = 2
  np.testing.assert_allclose(_features(cfg, jax.devices(), batch), want, atol=1e-5)
  return cfg, batch, want


@pytest.mark.parametrize('fault', ['skip', 'repeat', 'no_rotation'])
def test_a_broken_schedule_changes_the_result(fault, circular, monkeypatch):
  """The equality above is not luck: each fault of the schedule moves the hidden states."""
  cfg, batch, want = circular
  if fault == 'no_rotation':
    monkeypatch.setattr(pipeline, 'rotate', lambda h: h)
  else:
    monkeypatch.setattr(pipeline, 'schedule', {'skip': _skip, 'repeat': _repeat}[fault])
  assert np.max(np.abs(_features(cfg, jax.devices(), batch) - want)) > 1e-2


def _router_losses(cfg, devices, batch):
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  model = build_model(cfg.model)
  params = nn.unbox(model.init(jax.random.key(0), batch['inputs'][:1])['params'])
  with sharding.activate(mesh, sharding.rules_for(cfg.model, cfg.mesh, mesh)):
    extras = jax.jit(lambda p: objective_sums(model, p, batch)[1][1])(params)
  return {k: float(extras[k]) for k in
          ('moe_aux_loss', 'moe_router_z_loss', 'moe_load_max', 'moe_load_min')}


def test_moe_router_losses_are_the_whole_batch_values():
  """Micro-batch means of the balance loss differ from the whole batch's: not used."""
  cfg = _cfg('', moe=True)
  batch = _packed_batch()
  want = _router_losses(cfg, jax.devices()[:1], batch)
  cfg.mesh.pipeline = 2
  got = _router_losses(cfg, jax.devices(), batch)
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=1e-6), k


def test_stages_exchange_activations_by_collective_permute():
  """The rotation is a collective-permute, counted once per iteration of the schedule."""
  cfg = _cfg('')
  cfg.model.n_layers = 4
  batch = _packed_batch()
  assert collectives.collective_bytes(_features(cfg, jax.devices(), batch, True))[
      'collective-permute'] == 0  # data=8: nothing to permute
  cfg.mesh.pipeline = 2
  sent = collectives.collective_bytes(_features(cfg, jax.devices(), batch, True))
  # Each of the 3 iterations moves one micro-batch's [2 rows / 4 devices, 32, 32] fp32 state.
  assert sent['collective-permute'] >= 3 * (8 // 2 // 4) * 32 * cfg.model.d_model * 4


def test_bad_pipeline_configs_are_one_line(corpus):
  cases = {
      'model.n_layers=6 is not divisible by 4 pipeline stages': dict(n_layers=6),
      'x model.pipeline_repeats=2': dict(pipeline_repeats=2, n_layers=4),
      'model.pipeline_microbatches=2 must be >= the 4': dict(pipeline_microbatches=2),
      'do not split into model.pipeline_microbatches=8': dict(pipeline_microbatches=8),
      'need model.scan_layers=True': dict(scan_layers=False),
  }
  for msg, model in cases.items():
    cfg = _cfg(corpus, mesh=dict(pipeline=4), model=model)
    with pytest.raises(ConfigError, match=msg.replace('.', r'\.')):
      engine.Setup(cfg)


def test_plan_prints_the_bubble_and_collective_permute_bytes(capsys):
  from jaxlm.cli import main as cli  # noqa: PLC0415
  assert cli.main(['plan', '--config=tiny', '--config.model.n_layers=4', '--config.mesh.pipeline=2',
                   '--config.mesh.fsdp=2', '--config.model.pipeline_repeats=2',
                   '--config.model.pipeline_microbatches=4', '--config.train.batch_size=16',
                   '--target=1']) == 0
  out = capsys.readouterr().out
  assert 'pipeline    2 stages x 2 repeats, 4 micro-batches: bubble 11.1%' in out, out
  traffic = next(l for l in out.splitlines() if l.startswith('collectives'))
  assert 'collective-permute' in traffic and 'all-gather' in traffic, out
