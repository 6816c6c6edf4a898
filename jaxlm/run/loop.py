"""The train loop: wires config -> mesh -> model -> data -> shardings -> state -> hooks.

``Trainer(cfg, workdir).run()`` reads top to bottom in data-flow order. The
model on its mesh (shardings, compiled steps) is ``jaxlm.engine.build.Setup``; the
pure step lives in jaxlm.optim.step; everything with side effects (logging,
checkpoints, hooks, signals) lives here.
"""

import contextlib
import logging
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import evals
from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.core import config as config_lib
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import storage
from jaxlm.core.errors import ConfigError, DivergedError
from jaxlm.data import workdir_tokenizer
from jaxlm.data.pipeline import make_pipeline
from jaxlm.engine import warm_start
from jaxlm.engine.build import Setup, check_placeable
from jaxlm.evals import hooks as hooks_lib
from jaxlm.evals.multiple_choice import multiple_choice_hook
from jaxlm.optim.optimizer import resume_horizon
from jaxlm.run import metrics as metrics_lib
from jaxlm.run import peers, preflight, runtime
from jaxlm.run import progress as progress_lib
from jaxlm.run import watchdog

log = logging.getLogger('jaxlm')


class _Signals:
  """First SIGTERM/SIGINT: finish the step, checkpoint, exit 75. Second SIGINT: abort now."""

  def __init__(self):
    self.stop = False
    self._old = {}
    self._sync_failed = False
    self.at = None  # when the first signal arrived (monotonic)

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.stop:
      if signum == signal.SIGTERM:
        return  # the same stop again (SLURM signals every process of a step, and
        #         jaxlm.run.supervise forwards it to its child too): only Ctrl-C aborts
      log.info('second interrupt: aborting without saving (the last checkpoint is intact)')
      raise SystemExit(130)
    self.stop = True
    self.at = time.monotonic()
    log.info('%s received: finishing this step and saving a checkpoint',
             signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def preempted(self, step: int, sync_every: int) -> bool:
    """Whether to stop after ``step``; all processes of a multi-host run agree on it."""
    if jax.process_count() == 1:
      return self.stop
    if not self._sync_failed:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return True
      except Exception as e:  # noqa: BLE001  (jax raises RuntimeError/XlaRuntimeError)
        # Said once: without jax.distributed's preemption service (off TPU pods) the
        # signal agreement below is the only stop; a repeat every step would be noise.
        self._sync_failed = True
        log.info('preemption sync point unavailable (%s: %s); stopping on signals agreed '
                 'every %d steps instead', type(e).__name__, str(e).splitlines()[0][:200],
                 max(sync_every, 1))
    # A signal may reach only some processes; agree every few steps (a tiny all-gather).
    if step % max(sync_every, 1) == 0:
      return bool(np.any(multihost_utils.process_allgather(np.array(self.stop))))
    return False


class Trainer:
  """One training run in one workdir; resumes if the workdir has checkpoints."""

  def __init__(self, cfg, workdir: str, restore_step: int | None = None, devices=None):
    self.cfg = cfg
    self.devices = devices  # None = all devices; tests pass a subset
    self.workdir = workdir
    self.restore_step = restore_step
    self.hooks: list[hooks_lib.Hook] = []
    self._stop_requested = False

  def add_hook(self, hook: hooks_lib.Hook) -> None:
    self.hooks.append(hook)

  def request_stop(self) -> None:
    """Stops after the current step with a checkpoint, as SIGTERM does (callable from hooks)."""
    self._stop_requested = True

  def run(self) -> dict:
    """Trains to ``train.steps``; returns the last metrics, 'step' and 'stopped_early'.

    'stopped_early' is True when a signal or ``request_stop`` ended the run
    first, with a committed checkpoint. Raises DivergedError (train.max_bad_steps
    skipped steps in a row), StorageError (a save failed), or ConfigError /
    DataError / CheckpointError (bad input). Whatever happens, everything the
    run opened is closed on the way out of the ``with cleanup`` block below.
    """
    workdir = self.workdir
    runtime.initialize()
    config_lib.validate(self.cfg)
    cfg = self.cfg = preflight.absolute_paths(self.cfg)
    cfg = self.cfg = warm_start.resolve(cfg, workdir)  # checked before the workdir is written
    has_run = storage.path(workdir).joinpath('config.json').exists()
    saved = config_lib.load_saved(workdir) if has_run else None
    if saved is not None:  # resuming: the run keeps the tokenizer copy it recorded
      workdir_tokenizer.adopt_saved(cfg, saved)
    changed = config_lib.conflicts(cfg, workdir)
    if changed:
      raise ConfigError(f"workdir '{workdir}' holds a run with a different config: "
                        f"{'; '.join(changed[:5])} (use a new --workdir; with --init_from={workdir} "
                        "it starts from this run's parameters)")

    log.info('mesh: building from %s', dict(cfg.mesh))
    mesh = mesh_lib.make_mesh(cfg.mesh, self.devices)
    log.info('data: loading %s', cfg.data.source)
    data = make_pipeline(cfg, jax.process_index(), jax.process_count())
    preflight.check_vocab(cfg, data.tokenizer)
    # Batch, length and every parameter's shape over the mesh, before the first byte is written.
    check_placeable(Setup(cfg, mesh))
    tokenizer_copy = None if saved is not None else workdir_tokenizer.plan(cfg, workdir,
                                                                           data.tokenizer)
    with contextlib.ExitStack() as cleanup:
      it = data.train_iterator()
      if hasattr(it, 'close'):
        cleanup.callback(it.close)
      ckpt = cleanup.enter_context(Checkpointer(workdir, cfg.checkpoint))
      peers.watch_checkpoints(ckpt.directory)  # named in the line a lost process ends with
      cfg = self.cfg = self._with_horizon(ckpt)
      cfg = self.cfg = workdir_tokenizer.install(cfg, workdir, tokenizer_copy, runtime.is_main())
      if runtime.is_main():  # only once the config has proved loadable
        config_lib.save(cfg, workdir)
      setup = Setup(cfg, mesh)
      log.info('mesh: %s', dict(setup.mesh.shape))
      if cfg.model.moe_experts:
        log.info('model: %s active params per token (MoE: top %d of %d experts)',
                 f'{metrics_lib.active_params(cfg.model, setup.n_params):,}', cfg.model.moe_top_k,
                 cfg.model.moe_experts)
      log.info('model: %s params (%s, %d layers, d_model %d)', f'{setup.n_params:,}',
               cfg.model.position, cfg.model.n_layers, cfg.model.d_model)
      step = self._restore_or_init(setup, ckpt, it)
      writer = metrics_lib.MetricsWriter(workdir, enabled=runtime.is_main())
      cleanup.push(lambda exc_type, *_: writer.close(quiet=exc_type is not None))
      writer.drop_after(step)
      return self._train(setup, data, it, ckpt, writer, step, cleanup)

  def _with_horizon(self, ckpt: Checkpointer):
    """The config with optim.decay_steps set to the horizon this run uses (saved in config.json)."""
    cfg = self.cfg.copy_and_resolve_references()
    step = ckpt.pick_step(self.restore_step)
    saved = None
    if step and storage.path(self.workdir).joinpath('config.json').exists():
      old = config_lib.load_saved(self.workdir)
      saved = old.optim.get('decay_steps') or old.train.steps
    steps = resume_horizon(cfg, saved, step or 0)
    if steps != saved and saved is not None:
      log.info('schedule: horizon %d -> %d steps (the lr at step %d is unchanged)', saved, steps,
               step)
    with cfg.unlocked():
      cfg.optim.decay_steps = steps
    return cfg

  def _train(self, setup, data, it, ckpt, writer, step, cleanup) -> dict:
    cfg, workdir = self.cfg, self.workdir
    state = self._state
    tokenizer = data.tokenizer
    flops_tok = metrics_lib.flops_per_token(
        cfg.model, metrics_lib.matmul_params(cfg.model, setup.n_params), cfg.data.seq_len)
    peak = metrics_lib.device_peak_flops(cfg.train.peak_flops) * jax.device_count()
    hooks = self._builtin_hooks(data) + self.hooks

    def context(step):
      return hooks_lib.HookContext(
          step=step, cfg=cfg, mesh=setup.mesh, tokenizer=tokenizer, state=state,
          model=setup.model, workdir=workdir, writer=writer,
          eval_loss=lambda batches: setup.eval_loss(state.params, batches),
          generate=lambda prompts, **kw: setup.generate_text(state.params, tokenizer, prompts, **kw))

    profile = [int(s) for s in cfg.train.profile_steps.split(',')] if cfg.train.profile_steps else None
    progress = progress_lib.Progress(cfg.train.steps, step,
                                     bar=runtime.is_main() and cfg.train.progress)
    cleanup.callback(progress.close)
    first = step + 1  # this process compiles the step here: logged, but not timed
    # Skipped steps are counted on device; the host reads the counts on log steps, every
    # check_every steps, and on every step while a run of bad steps lasts, so it stops
    # exactly at train.max_bad_steps without a host sync per step in a healthy run.
    check_every = min(cfg.train.log_every, cfg.train.max_bad_steps)
    skipped = int(jax.device_get(state.skipped_steps))
    bad = 0
    last = {}
    t_last, step_last = time.perf_counter(), step
    log.info('train: steps %d -> %d', step, cfg.train.steps)
    # Leaving run()'s cleanup block (also by an exception, e.g. a hook running out of
    # memory) closes the checkpointer, which first finishes any save in flight.
    watch = cleanup.enter_context(watchdog.Watchdog(cfg.train.step_timeout))
    with _Signals() as signals:
      while step < cfg.train.steps:
        watch.begin(f'step {step + 1}')
        if profile and step == profile[0]:
          jax.profiler.start_trace(f'{workdir}/profile')
        batch = setup.device_batch(next(it))
        state, m = setup.train_step(state, batch)
        step += 1
        if profile and step == profile[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        if step == first:
          jax.block_until_ready(state)
          t_last, step_last = time.perf_counter(), step
          progress.started(step)
        log_now = step % cfg.train.log_every == 0 or step == cfg.train.steps or step == first
        if log_now or bad or step % check_every == 0:
          m = jax.device_get(m)
          streak, bad = bad, int(m['bad_steps'])
          if int(m['skipped_steps']) > skipped and (log_now or not streak):
            log.info('train: %d step(s) skipped by step %d (non-finite loss or gradients%s); '
                     '%d in total', int(m['skipped_steps']) - skipped, step,
                     ', or a loss spike' if cfg.train.spike_factor else '',
                     int(m['skipped_steps']))
            skipped = int(m['skipped_steps'])
        diverged = bad >= cfg.train.max_bad_steps
        if log_now or diverged:
          now = time.perf_counter()
          last = {'train/loss': float(m['loss']), 'train/lr': float(m['lr']),
                  'train/grad_norm': float(m['grad_norm']),
                  'train/skipped_steps': float(m['skipped_steps']),
                  **{f'train/{k}': float(v) for k, v in m.items() if k.startswith('moe_')}}
          if step > step_last:  # steps timed since the last line (none right after compile)
            tok_s = float(m['tokens']) * (step - step_last) / max(now - t_last, 1e-9)
            last.update({'train/tokens_per_sec': tok_s, 'train/mfu': tok_s * flops_tok / peak})
          t_last, step_last = now, step
          writer.write(step, last)
          progress.train(step, last)
          ckpt.check()  # a background save that failed ends the run now, not at the next save
        if diverged:
          self._diverged(ckpt, step, m)
        progress.update()
        self._state = state
        # The step's checkpoint is written before hooks run, so a hook that fails
        # (an eval that runs out of memory) cannot cost it.
        preempted = signals.preempted(step, cfg.train.log_every)
        if preempted:
          watch.grace(signals.at or time.monotonic(), cfg.train.preemption_grace)
        saved = (step == cfg.train.steps or preempted
                 or bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0))
        if saved:
          watch.begin(f'save step {step}', 'save')
          ckpt.save(step, state, it.get_state(), force=step == cfg.train.steps or preempted)
        t_hooks = time.perf_counter()
        # A preemption's grace period is for the checkpoint: only hooks that opt in run.
        live = [h for h in hooks if h.on_preempt] if preempted else hooks
        phase = lambda name: watch.begin(f'hook {name} at step {step}', 'eval')  # noqa: E731
        out = hooks_lib.run_hooks(live, context(step), before=phase)
        stopping = self._stop_requested or preempted
        final = step == cfg.train.steps or stopping
        if final:  # every hook runs once more at the end (forced), e.g. final eval
          out.update(hooks_lib.run_hooks([h for h in live if not h.due(step, False)],
                                         context(step), force=True, before=phase))
        if out:
          writer.write(step, out)
          last.update(out)
          progress.eval(step, out, time.perf_counter() - t_hooks)
        if final and not saved:  # a hook asked to stop
          watch.begin(f'save step {step}', 'save')
          ckpt.save(step, state, it.get_state(), force=True)
        if (ckpt.keep_best and 'eval/loss' in out
            and ckpt.save_best(step, state, it.get_state(), out['eval/loss'])):
          log.info('checkpoint: step %d is among the %d best by eval/loss (%.4f) in %s',
                   step, ckpt.keep_best, out['eval/loss'], ckpt.best_directory)
        if out or saved or step == step_last:
          # Keep eval and checkpoint time out of the next tokens/s figure.
          jax.block_until_ready(state)
          t_last, step_last = time.perf_counter(), step
        if stopping:
          break
    progress.close()
    watch.begin(f'save: waiting for step {step} to commit', 'save')
    ckpt.wait()  # committed (or a StorageError) before the run reports anything
    watch.end()
    self._state = state
    if step < cfg.train.steps:
      log.info('stopped at step %d; checkpoint saved in %s; rerun the same command to resume',
               step, ckpt.directory)
    else:
      log.info('done: step %d, checkpoints in %s', step, ckpt.directory)
    return {'step': step, 'stopped_early': step < cfg.train.steps, **last}

  def _diverged(self, ckpt: Checkpointer, step: int, m) -> None:
    """Stops the run: train.max_bad_steps steps in a row were skipped. Nothing is saved."""
    bad = int(m['bad_steps'])
    ckpt.wait()  # saves in flight hold good states; let them commit first
    latest = ckpt.latest_step()
    good = (f'step {latest} in {ckpt.directory}' if latest is not None
            else 'none (a rerun starts from scratch)')
    raise DivergedError(
        f'training diverged: steps {step - bad + 1}-{step} were all skipped (loss '
        f"{float(m['loss'])}; train.max_bad_steps={self.cfg.train.max_bad_steps}); stopped "
        f'without saving; last good checkpoint: {good}; lower optim.lr or check the data, then '
        'rerun to resume from it')

  def _restore_or_init(self, setup: Setup, ckpt: Checkpointer, it) -> int:
    step = ckpt.pick_step(self.restore_step)
    if step is None and self.cfg.train.init_from:
      self._state = setup.state_from_params(warm_start.params(setup, self.cfg))
      return 0
    if step is None:
      log.info('init: fresh parameters (seed %d)', self.cfg.train.seed)
      self._state = setup.init_state()
      return 0
    if ckpt.holds_params_only(step):
      log.info('init: parameters of step %d from %s (an import: no optimizer state yet)',
               step, ckpt.directory)
      params, _ = ckpt.restore(step, setup.abstract_state, params_only=True)
      self._state = setup.state_from_params(params, step)
      return step
    log.info('resume: restoring step %d from %s', step, ckpt.directory)
    self._state, data_state = ckpt.restore(step, setup.abstract_state)
    if data_state:
      it.set_state(data_state)
    return int(jax.device_get(self._state.step))

  def _builtin_hooks(self, data) -> list[hooks_lib.Hook]:
    e = self.cfg.eval
    every = e.every
    batches = data.eval_batches()  # supervised pairs without data.eval_path have none
    hooks = [hooks_lib.eval_loss_hook({'val': batches}, every)] if batches else []
    prompts = [p for p in e.sample_prompts.split('|') if p]
    if prompts and e.sample_every:
      hooks.append(hooks_lib.sample_hook(prompts, e.sample_tokens, e.sample_every))
    if e.multiple_choice:
      hooks.append(multiple_choice_hook(e.multiple_choice, every))
    if e.lm_eval_tasks:
      hooks.append(evals.load_lm_eval().lm_eval_hook(
          e.lm_eval_tasks.split(','), every, e.lm_eval_include, e.lm_eval_limit, e.lm_eval_fewshot))
    for spec in filter(None, (s.strip() for s in e.hooks.split(','))):
      hooks.append(hooks_lib.load_user_hook(spec, every))
    return hooks

