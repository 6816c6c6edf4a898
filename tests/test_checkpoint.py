"""Never lose a run: kill -9 and SIGTERM, resharding restore, corrupt and partial checkpoints."""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxlm
from conftest import load_config
from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.core.errors import CheckpointError, DivergedError, StorageError
from jaxlm.core.mesh import make_mesh
from jaxlm.core.tree import all_finite
from jaxlm.data.pipeline import make_pipeline
from jaxlm.engine import build as engine
from jaxlm.engine.build import Setup
from jaxlm.evals.hooks import Hook
from jaxlm.run.loop import Trainer


# Subprocesses run on one CPU device: faster steps, same code path.
ENV = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}


def _cmd(workdir, data, steps=60):
  return [sys.executable, '-m', 'jaxlm', 'train', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.data.path={data}', f'--config.train.steps={steps}',
          '--config.train.log_every=1', '--config.checkpoint.every=5', '--config.eval.every=0']


def _losses(workdir):
  rows = [json.loads(l) for l in (Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r['train/loss']) for r in rows if 'train/loss' in r]


def _lines(workdir) -> int:
  path = Path(workdir) / 'metrics.jsonl'
  return len(path.read_text().splitlines()) if path.exists() else 0


def _committed_steps(workdir) -> list[int]:
  """Steps whose Orbax directory has been committed (renamed from its temporary name)."""
  d = Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _start_and_wait_for(cmd, repo, workdir, lines):
  proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=ENV)
  deadline = time.time() + 120
  while _lines(workdir) < lines and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  return proc


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """(data path, losses) of a 60-step run that nothing interrupts."""
  from conftest import REPO, SHAKESPEARE  # noqa: PLC0415
  root = tmp_path_factory.mktemp('uninterrupted')
  data = root / 'text.txt'
  data.write_text(SHAKESPEARE.read_text()[:60_000])
  subprocess.run(_cmd(root / 'full', data), cwd=REPO, check=True, capture_output=True,
                 timeout=300, env=ENV)
  return data, _losses(root / 'full')


def test_kill_9_then_rerun_gives_the_uninterrupted_losses(repo, uninterrupted, tmp_path):
  data, full = uninterrupted
  part = tmp_path / 'part'
  # A different kill point per run covers more of the loop; the seed is printed (and
  # JAXLM_TEST_KILL_SEED=<seed> replays it) so a failure reproduces.
  seed = int(os.environ.get('JAXLM_TEST_KILL_SEED', random.SystemRandom().randrange(2**32)))
  kill_at = random.Random(seed).randint(8, 50)
  print(f'kill -9 test: JAXLM_TEST_KILL_SEED={seed} -> kill after {kill_at} metric lines')
  proc = _start_and_wait_for(_cmd(part, data), repo, part, kill_at)
  # The test is about resuming: an early kill point must not beat the first async save's commit.
  deadline = time.time() + 120
  while not _committed_steps(part) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
  done = subprocess.run(_cmd(part, data), cwd=repo, capture_output=True, text=True, timeout=300,
                        env=ENV)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'resume: restoring step' in done.stderr
  assert _losses(part) == full, f'JAXLM_TEST_KILL_SEED={seed}'


def test_sigterm_exits_75_with_a_checkpoint_and_the_rerun_finishes_bit_identically(
    repo, uninterrupted, tiny_cfg, tmp_path):
  data, full = uninterrupted
  work = tmp_path / 'w'
  proc = _start_and_wait_for(_cmd(work, data), repo, work, 3)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-2000:]  # EX_TEMPFAIL: stopped early, rerun to resume
  step = _losses(work)[-1][0]
  assert step < 60, 'the run ended before the signal'
  assert f'stopped at step {step}; checkpoint saved in' in err
  # The grace period is for the checkpoint: the final eval (eval.every=0) is not run.
  rows = [json.loads(l) for l in (work / 'metrics.jsonl').read_text().splitlines()]
  assert not [r for r in rows if 'eval/loss' in r], rows[-3:]
  ckpt = Checkpointer(str(work), tiny_cfg.checkpoint, read_only=True)
  assert ckpt.latest_step() == step
  ckpt.close()
  done = subprocess.run(_cmd(work, data), cwd=repo, capture_output=True, text=True, timeout=300,
                        env=ENV)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'resume: restoring step {step}' in done.stderr
  assert _losses(work) == full


def test_second_ctrl_c_aborts_at_once_and_keeps_the_last_checkpoint(repo, tiny_cfg, tmp_path):
  work = tmp_path / 'w'
  cmd = _cmd(work, tiny_cfg.data.path, steps=100_000)
  proc = _start_and_wait_for(cmd, repo, work, 12)  # checkpoints at steps 5 and 10 exist
  proc.send_signal(signal.SIGINT)
  # Python runs a handler once for signals that arrive together; send the second
  # Ctrl-C once the first one is acknowledged, while the loop is saving.
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if 'SIGINT received' in line:
      proc.send_signal(signal.SIGINT)
      break
  _, rest = proc.communicate(timeout=120)
  err = ''.join(seen) + rest
  assert proc.returncode == 130, err[-2000:]
  assert 'second interrupt: aborting without saving' in err
  # Saves still in flight (step 10's async one, the final one) may be lost; what is
  # listed is committed, and the run continues from it to the end.
  ckpt = Checkpointer(str(work), tiny_cfg.checkpoint, read_only=True)
  latest = ckpt.latest_step()
  assert latest is not None and latest >= 5
  ckpt.close()
  cmd[cmd.index('--config.train.steps=100000')] = f'--config.train.steps={_losses(work)[-1][0] + 3}'
  cmd.append('--config.optim.decay_steps=100000')  # a shorter run keeps the lr schedule
  done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, env=ENV)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'resume: restoring step {latest}' in done.stderr


def _train_sharded(cfg, workdir, **mesh):
  for k, v in mesh.items():
    cfg.mesh[k] = v
  cfg.checkpoint.every = 0
  Trainer(cfg, str(workdir)).run()


def _eval_on(cfg, workdir, devices=None, **mesh):
  cfg = cfg.copy_and_resolve_references()
  for k, v in {'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': 1, **mesh}.items():
    cfg.mesh[k] = v
  from jaxlm.core import mesh as mesh_lib  # noqa: PLC0415
  setup = Setup(cfg, mesh_lib.make_mesh(cfg.mesh, devices))
  ckpt = Checkpointer(str(workdir), cfg.checkpoint)
  state, _ = ckpt.restore(ckpt.latest_step(), setup.abstract_state)
  return setup.eval_loss(state.params, make_pipeline(cfg).eval_batches()), state


def test_restore_onto_other_meshes_gives_the_same_eval_loss(tiny_cfg, tmp_path):
  _train_sharded(tiny_cfg, tmp_path / 'w', data=1, fsdp=8)
  a, _ = _eval_on(tiny_cfg, tmp_path / 'w', fsdp=8)
  b, state = _eval_on(tiny_cfg, tmp_path / 'w', fsdp=4, tensor=2)
  c, _ = _eval_on(tiny_cfg, tmp_path / 'w', devices=jax.devices()[:1])
  assert state.params['layers']['mlp']['up']['kernel'].addressable_shards[0].data.shape[-1] == 32
  np.testing.assert_allclose([b, c], [a, a], rtol=1e-5)


@pytest.fixture(scope='module')
def _trained_once(tmp_path_factory):
  from conftest import SHAKESPEARE  # noqa: PLC0415
  root = tmp_path_factory.mktemp('trained')
  (root / 'text.txt').write_text(SHAKESPEARE.read_text()[:60_000])
  cfg = load_config('tiny')
  cfg.data.path = str(root / 'text.txt')
  cfg.train.steps = 10
  cfg.checkpoint.every = 5
  cfg.eval.every = 0
  Trainer(cfg, str(root / 'w'), devices=jax.devices()[:1]).run()
  return cfg, root / 'w'


@pytest.fixture
def trained(_trained_once, tmp_path):
  """A fresh copy of a 10-step run (checkpoints at 5 and 10) that a test may damage."""
  cfg, work = _trained_once
  shutil.copytree(work, tmp_path / 'w')
  return cfg.copy_and_resolve_references(), tmp_path / 'w'


def test_truncated_array_file_is_a_clear_error(trained):
  cfg, work = trained
  files = sorted((work / 'checkpoints' / '10' / 'state').rglob('*'), key=lambda p: p.stat().st_size)
  data_files = [f for f in files if f.is_file() and 'd' == f.parent.name]
  victim = data_files[-1] if data_files else [f for f in files if f.is_file()][-1]
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
  setup = Setup(cfg, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1),
                                       ('data', 'fsdp', 'tensor', 'sequence')))
  with pytest.raises(CheckpointError, match=r'checkpoint step 10 in .*checkpoints is corrupt.*restore_step'):
    Checkpointer(str(work), cfg.checkpoint).restore(10, setup.abstract_state)


def test_kill_9_during_an_async_save_keeps_the_previous_step(repo, tiny_cfg, tmp_path):
  """SIGKILL while step 10's async save is being written: step 5 stays the latest, the
  half-written step is never listed, and rerunning resumes from step 5."""
  work = tmp_path / 'w'
  # ~1.7M params: state + Adam ~20 MB, so the save is in flight long enough to be caught.
  cmd = _cmd(work, tiny_cfg.data.path, steps=10) + [
      '--config.model.d_model=256', '--config.model.mlp_dim=1024']
  proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=ENV)
  ckpts, seen = work / 'checkpoints', None
  deadline = time.time() + 240
  while seen is None and proc.poll() is None and time.time() < deadline:
    if ckpts.is_dir():
      seen = next((p for p in ckpts.iterdir() if p.name.startswith('10.orbax-checkpoint-tmp')), None)
    time.sleep(0.002)
  assert seen is not None, 'never saw step 10 being written'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert seen.exists(), 'the save committed before the kill; nothing was tested'
  cfg = load_config('tiny')
  ckpt = Checkpointer(str(work), cfg.checkpoint, read_only=True)
  assert ckpt.steps() == [5] and ckpt.latest_step() == 5
  ckpt.close()

  done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, env=ENV)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'resume: restoring step 5' in done.stderr
  assert [s for s, _ in _losses(work)] == list(range(1, 11))
  assert Checkpointer(str(work), cfg.checkpoint, read_only=True).latest_step() == 10
  assert not seen.exists()  # the rerun deleted the half-written directory


def test_a_writer_deletes_partial_step_directories(trained):
  # What a failed or killed save leaves; a resumed run may never save that step again.
  cfg, work = trained
  tmp = work / 'checkpoints' / '15.orbax-checkpoint-tmp-1234'
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'garbage').write_bytes(b'\0' * 100)
  assert Checkpointer(str(work), cfg.checkpoint, read_only=True).latest_step() == 10
  Checkpointer(str(work), cfg.checkpoint).close()  # deletes it in the background
  deadline = time.time() + 30
  while tmp.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert not tmp.exists()


def test_a_save_failure_reported_on_the_next_call_names_the_last_committed_step(trained):
  # Orbax lists an async save's step as soon as the save starts and reports its write failure
  # on the next call; the step never committed (what such a save leaves: its temporary dir).
  cfg, work = trained
  ckpt = Checkpointer(str(work), cfg.checkpoint)
  assert ckpt.latest_step() == 10
  (work / 'checkpoints' / '10').rename(work / 'checkpoints' / '10.orbax-checkpoint-tmp-1')
  with pytest.raises(StorageError, match=r'saving checkpoint step 10 to .*checkpoints/10 failed: '
                                         r'EFBIG .*; latest committed checkpoint: step 5 in'):
    with ckpt._storage(10, ckpt.directory):
      raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
  ckpt.close()


def test_a_non_finite_state_is_never_saved(trained):
  cfg, work = trained
  setup = Setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
  ckpt = Checkpointer(str(work), cfg.checkpoint)
  state, data = ckpt.restore(10, setup.abstract_state)
  bad = state.replace(params=jax.tree.map(lambda x: x.at[0].set(np.nan), state.params))
  with pytest.raises(DivergedError, match=r'refusing to save step 15: .*non-finite.*last good '
                                          r'checkpoint is step 10'):
    ckpt.save(15, bad, data, force=True)
  assert not ckpt.save_best(15, state, data, float('nan'))  # a NaN eval loss is never "best"
  ckpt.wait()
  assert ckpt.steps() == [5, 10] and ckpt.best_steps() == {}
  ckpt.close()


def test_divergence_stops_with_exit_3_and_leaves_only_finite_checkpoints(tiny_cfg, tmp_path):
  # The run: lr=1e36 makes every step from the third on non-finite.
  cfg = tiny_cfg
  cfg.optim.lr = 1e36
  cfg.train.steps = 60
  cfg.train.log_every = 20
  cfg.checkpoint.every = 5
  cfg.checkpoint.keep_best = 2
  cfg.eval.every = 5
  work = tmp_path / 'w'
  with pytest.raises(DivergedError) as e:
    Trainer(cfg, str(work), devices=jax.devices()[:1]).run()
  assert e.value.exit_code == 3
  assert re.search(r'steps 3-10 were all skipped .*stopped without saving; last good checkpoint: '
                   r'step 5 in', str(e.value)), str(e.value)
  def refuse(name):
    raise ValueError(name)
  rows = [json.loads(l, parse_constant=refuse)  # strict JSON: NaN is an error
          for l in (work / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['step'] == 10 and rows[-1]['train/skipped_steps'] == 8
  setup = Setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
  ckpt = Checkpointer(str(work), cfg.checkpoint, read_only=True)
  assert ckpt.steps() == [5]  # nothing at step 10: the run stopped there without saving
  for step in ckpt.steps() + sorted(ckpt.best_steps()):
    state, _ = ckpt.restore(step, setup.abstract_state)
    assert bool(all_finite(state)), step
  ckpt.close()


def test_a_checkpoint_from_before_the_step_guard_counters_still_resumes(trained):
  # jaxlm before the divergence guard saved TrainState(step, params, opt_state) only.
  import orbax.checkpoint as ocp  # noqa: PLC0415
  cfg, work = trained
  setup = Setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
  ckpt = Checkpointer(str(work), cfg.checkpoint)
  state, data = ckpt.restore(10, setup.abstract_state)
  ckpt.close()
  shutil.rmtree(work / 'checkpoints')
  old = ocp.CheckpointManager(str(work / 'checkpoints'), item_handlers={
      'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()})
  old.save(10, args=ocp.args.Composite(
      state=ocp.args.StandardSave({'step': state.step, 'params': state.params,
                                   'opt_state': state.opt_state}),
      data=ocp.args.JsonSave(data)))
  old.wait_until_finished()
  old.close()
  again, data_again = Checkpointer(str(work), cfg.checkpoint).restore(10, setup.abstract_state)
  assert data_again == data and int(again.step) == 10
  assert int(again.skipped_steps) == 0 and int(again.bad_steps) == 0 and float(again.loss_avg) == 0
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                  jax.tree.leaves((again.params, again.opt_state)), strict=True):
    np.testing.assert_array_equal(a, b)
  cfg.train.steps, cfg.optim.decay_steps = 12, 10  # and training goes on from it
  Trainer(cfg, str(work), devices=jax.devices()[:1]).run()
  assert Checkpointer(str(work), cfg.checkpoint, read_only=True).latest_step() == 12


def test_shape_mismatch_names_the_parameter(trained, capsys):
  cfg, work = trained
  cfg.model.mlp_dim = 128
  setup = Setup(cfg, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1),
                                       ('data', 'fsdp', 'tensor', 'sequence')))
  with pytest.raises(CheckpointError, match=r"mlp.*down.*kernel.*\(2, 64, 32\).*\(2, 128, 32\)"):
    Checkpointer(str(work), cfg.checkpoint).restore(10, setup.abstract_state)


def test_restore_step_picks_an_earlier_checkpoint(trained, repo, capsys):
  from jaxlm.cli.main import main  # noqa: PLC0415
  cfg, work = trained
  os.chdir(repo)
  assert main(['eval', f'--workdir={work}', '--restore_step=5']) == 0
  assert 'step 5: eval/loss' in capsys.readouterr().out


def test_keep_policy_last_k_every_mth_and_best_by_eval_loss(tiny_cfg, tmp_path, repo, capsys):
  from jaxlm.cli.main import main  # noqa: PLC0415
  cfg = tiny_cfg
  cfg.train.steps = 20
  cfg.checkpoint.every = 5
  cfg.checkpoint.keep = 2
  cfg.checkpoint.keep_period = 10
  cfg.checkpoint.keep_best = 2
  cfg.eval.every = 5
  # A scripted eval/loss (this hook runs after the built-in one and overrides it) makes
  # the best steps 5 and 15: not the last two, and step 5 is outside the last-2 + every-10th.
  scripted = {5: 1.0, 10: 3.0, 15: 2.0, 20: 4.0}
  params_at = {}

  def scripted_eval(ctx):
    params_at[ctx.step] = jax.device_get(ctx.params)
    return {'eval/loss': scripted[ctx.step]}

  work = tmp_path / 'w'
  trainer = Trainer(cfg, str(work), devices=jax.devices()[:1])
  trainer.add_hook(Hook(scripted_eval, every=5))
  trainer.run()

  ckpt = Checkpointer(str(work), cfg.checkpoint, read_only=True)
  assert ckpt.steps() == [10, 15, 20]  # last 2 plus every 10th
  assert ckpt.best_steps() == {5: 1.0, 15: 2.0}
  assert sorted(p.name for p in (work / 'checkpoints_best').iterdir() if p.name.isdigit()) == ['15', '5']
  ckpt.close()

  # Step 5 lives only in checkpoints_best; every reader finds it there and gets its params.
  loaded = engine.load(str(work), restore_step=5)
  assert loaded.step == 5
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.params), params_at[5])
  os.chdir(repo)
  assert main(['eval', f'--workdir={work}', '--restore_step=5']) == 0
  assert 'step 5: eval/loss' in capsys.readouterr().out
  assert main(['eval', f'--workdir={work}', '--restore_step=7']) == 2
  assert 'best by eval loss: [5, 15]' in capsys.readouterr().err

  # `jaxlm generate --restore_step`: greedy text of step 5, not of the latest step.
  def generate(*flags):
    assert main(['generate', f'--workdir={work}', '--prompt=ROMEO:', '--max_new_tokens=24',
                 *flags]) == 0
    return capsys.readouterr().out
  step5 = generate('--restore_step=5', '--temperature=0')
  assert step5 == 'ROMEO:' + jaxlm.generate_text(str(work), 'ROMEO:', max_new_tokens=24,
                                                  restore_step=5) + '\n'
  assert step5 != generate('--temperature=0')
  # Sampling flags: the same seed gives the same text, another seed another text.
  sampled = [generate('--restore_step=5', '--temperature=1.0', '--top_p=0.95', f'--seed={s}')
             for s in (1, 1, 2)]
  assert sampled[0] == sampled[1] and sampled[0] != sampled[2], sampled


def test_a_failed_save_is_one_line_exit_4_and_the_rerun_resumes(repo, tiny_cfg, tmp_path):
  # A real write failure without root: a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes
  # the checkpoint's largest array file fail with EFBIG, as a full disk fails with ENOSPC.
  # OCDBT packs arrays into data files as their writes happen to be flushed together, so with
  # tiny's d_model 32 (largest array 41 KB) the largest file varies from save to save, and the
  # step-10 save sometimes stayed under the limit (step 15 failed instead). An array is one
  # value in one file: an embedding over the limit (320 x 128 float32 = 160 KB, about 7%
  # compressible) fails the first save of the limited run, however the arrays are packed.
  cfg = tiny_cfg
  cfg.train.steps, cfg.train.log_every, cfg.checkpoint.every, cfg.eval.every = 5, 1, 5, 0
  cfg.optim.decay_steps = 20  # the schedule of the whole 20-step run (train.steps grows below)
  cfg.model.d_model = 128
  work = tmp_path / 'w'
  Trainer(cfg, str(work), devices=jax.devices()[:1]).run()  # commits step 5
  limited = ['bash', '-c', 'ulimit -f 100; trap "" XFSZ; exec "$@"', '_']  # 100 KiB
  # (The limit would also refuse jax's compilation-cache files, a warning that is not tested.)
  run = subprocess.run(limited + _cmd(work, cfg.data.path, steps=20) +
                       ['--config.model.d_model=128'], cwd=repo,
                       capture_output=True, text=True, timeout=300,
                       env={**ENV, 'JAX_ENABLE_COMPILATION_CACHE': 'false'})
  assert run.returncode == 4, run.stderr[-3000:]
  # Known leftover, seen once in a clean-clone CI run (2026-11-29): at interpreter exit Python
  # may warn that Orbax's aborted write coroutine ('...write_fragment') was never awaited, two
  # lines after the error line. A warnings filter set at the fault did not silence it (the
  # coroutine is finalized during module teardown); those two lines are not counted here.
  exit_warning = re.compile(r"(sys:1: )?RuntimeWarning: (coroutine '.*write_fragment' was never "
                            r'awaited|Enable tracemalloc to get the object allocation traceback)$')
  progress = re.compile(r'^\S+ jaxlm: step \d+/\d+ \| ')  # one line per train.log_every steps
  lines = [l for l in run.stderr.splitlines() if not exit_warning.match(l) and not progress.match(l)]
  errors = [l for l in lines if l.startswith('jaxlm: error:')]
  assert len(lines) < 10 and len(errors) == 1, run.stderr[-3000:]
  assert re.search(r'saving checkpoint step 10 to .*checkpoints/10 failed: EFBIG \(File too large\)'
                   r'; latest committed checkpoint: step 5 in', errors[0]), errors[0]
  assert list((work / 'checkpoints').glob('10.orbax-checkpoint-tmp*'))

  cfg.train.steps = 20
  assert Trainer(cfg, str(work), devices=jax.devices()[:1]).run()['step'] == 20
  ckpt = Checkpointer(str(work), cfg.checkpoint, read_only=True)
  assert ckpt.steps() == [10, 15, 20]
  ckpt.close()
  assert not list((work / 'checkpoints').glob('*.orbax-checkpoint-tmp*'))
