"""What each CLI command does, given parsed flags (see jaxlm.cli.main)."""

import logging
import math

import jax

from jaxlm.checkpoint.checkpointer import restore_params
from jaxlm.cli import plan as plan_lib
from jaxlm.cli import targets
from jaxlm.core import config as config_lib
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import storage
from jaxlm.core.errors import EXIT_OK, EXIT_PREEMPTED, ConfigError
from jaxlm.data.pipeline import make_pipeline
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.engine.build import Setup
from jaxlm.engine.generate import check_sampling
from jaxlm.run import metrics as metrics_lib
from jaxlm.run import peers, preflight, runtime
from jaxlm.run.lock import WorkdirLock
from jaxlm.run.loop import Trainer

log = logging.getLogger('jaxlm')


def _workdir(fv) -> str:
  if not fv.workdir:
    raise ConfigError('--workdir is required')
  return fv.workdir


def train(fv) -> int:
  runtime.initialize(fv.coordinator_address, fv.num_processes, fv.process_id,
                     peer_timeout=fv.peer_timeout)
  workdir = _workdir(fv)
  cfg, restore_step = fv.config, fv.restore_step
  if fv.init_from:  # --restore_step then picks the source's step
    cfg.train.init_from = fv.init_from
    cfg.train.init_from_step = -1 if restore_step is None else restore_step
    restore_step = None
  trainer = Trainer(cfg, workdir, restore_step=restore_step)
  with WorkdirLock(workdir, stale_after=fv.lock_timeout, force=fv.force_unlock) as lock:
    trainer.add_hook(lock.hook())
    try:
      summary = trainer.run()
    except Exception as e:  # noqa: BLE001  (a lost peer surfaces as any jax error)
      peers.collective_failed(e)  # ends the process (exit 75) if a peer is gone
      raise
  if runtime.is_main() and 'train/loss' in summary:
    extra = f", eval/loss {summary['eval/loss']:.4f}" if 'eval/loss' in summary else ''
    print(f"step {summary['step']}: train/loss {summary['train/loss']:.4f}{extra}")
  peers.finished()  # our silence from now on is expected (not a lost process)
  # Diverged (3) and storage faults (4) arrive as errors; see jaxlm.core.errors for all codes.
  return EXIT_PREEMPTED if summary['stopped_early'] else EXIT_OK


def _saved_run(fv):
  """(config, Setup, restored params, step) for a saved run, on this machine's devices."""
  workdir = _workdir(fv)
  runtime.initialize()
  cfg = fv.config if fv.config is not None else config_lib.load_saved(workdir)
  setup = Setup(cfg, mesh_lib.fit_to_host(cfg))
  # Params only: eval and generate need no optimizer state (an HF import has none).
  params, step = restore_params(workdir, cfg.checkpoint, setup.abstract_state, fv.restore_step)
  return cfg, setup, params, step


def eval(fv) -> int:  # noqa: A001  (the command's name)
  if fv.tasks:
    return lm_eval_tasks(fv)
  cfg, setup, params, step = _saved_run(fv)
  data = make_pipeline(cfg, jax.process_index(), jax.process_count())
  preflight.check_vocab(cfg, data.tokenizer)  # an id past the embedding rows is a NaN loss
  loss = setup.eval_loss(params, data.eval_batches())
  if runtime.is_main():
    storage.append_text(storage.join(fv.workdir, 'metrics.jsonl'),
                        metrics_lib.json_line(step, {'eval/loss': loss}) + '\n')
    print(f'step {step}: eval/loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.3f}')
  return 0


def lm_eval_tasks(fv) -> int:
  """lm-evaluation-harness tasks on a saved run: <workdir>/lm_eval/step_N.json + tensorboard."""
  from jaxlm.engine.build import load  # noqa: PLC0415
  from jaxlm.evals import load_lm_eval  # noqa: PLC0415
  from jaxlm.run.metrics import MetricsWriter  # noqa: PLC0415
  adapter = load_lm_eval()
  workdir = _workdir(fv)
  runtime.initialize()
  manager, tasks = adapter.task_manager(fv.tasks, fv.include_path)  # names checked before loading
  loaded = load(workdir, fv.restore_step)
  lm = adapter.JaxlmLM.from_parts(loaded.setup.model, loaded.params, get_tokenizer(loaded.cfg.data),
                                  loaded.setup.mesh, loaded.setup.rules, fv.batch_size)
  results = adapter.simple_evaluate(lm, tasks, fv.limit, fv.num_fewshot, manager=manager)
  path = adapter.write_results(workdir, loaded.step, results)
  writer = MetricsWriter(workdir, enabled=runtime.is_main())
  writer.write(loaded.step, adapter.flat_metrics(results))
  writer.close()
  if runtime.is_main():
    from lm_eval.utils import make_table  # noqa: PLC0415
    print(make_table(results))
    print(f'step {loaded.step}: results in {path}')
  return 0


def generate(fv) -> int:
  check_sampling(fv.temperature, fv.top_k, fv.top_p)  # before loading anything
  if fv.max_new_tokens < 1:
    raise ConfigError(f'--max_new_tokens={fv.max_new_tokens} must be >= 1')
  cfg, setup, params, _ = _saved_run(fv)
  tokenizer = get_tokenizer(cfg.data)
  preflight.check_vocab(cfg, tokenizer)
  text = setup.generate_text(params, tokenizer, [fv.prompt],
                             max_new_tokens=fv.max_new_tokens, temperature=fv.temperature,
                             top_k=fv.top_k, top_p=fv.top_p, seed=fv.seed)[0]
  if runtime.is_main():
    print(fv.prompt + text)
  return 0


def _gib(n: float) -> str:
  """Bytes in GiB, or MiB/KiB for small figures (tiny configs)."""
  for unit, size in (('GiB', 2**30), ('MiB', 2**20)):
    if n >= 0.1 * size:
      return f'{n / size:.2f} {unit}'
  return f'{n / 2**10:.1f} KiB'


def _print_traffic(e) -> None:
  """Collective bytes per device and step, and the pipeline's bubble, of a compiled step."""
  traffic = ', '.join(f'{k} {_gib(v)}' for k, v in e.get('collectives', {}).items() if v)
  print(f"collectives per device per step: {traffic or 'none'}")
  p = e.get('pipeline')
  if p:
    print(f"pipeline    {p['stages']} stages x {p['repeats']} repeats, {p['microbatches']} "
          f"micro-batches: bubble {p['bubble']:.1%} = (stages - 1) / (microbatches x repeats"
          ' + stages - 1)')


def plan(fv) -> int:
  """Compiles the train step for the configured mesh (any size) and says whether it fits."""
  cfg = fv.config
  config_lib.validate(cfg, need_data=False)
  devices = fv.devices
  if not targets.sized(fv.target):  # GPUs, a bare TPU kind, GiB: as many as the mesh needs
    devices = plan_lib.mesh_devices(cfg, fv.devices)
  where, budget, hw = plan_lib.target_budget(fv.target, devices, fv.slices)
  devices = hw.devices if hw else plan_lib.mesh_devices(cfg, fv.devices)
  native = plan_lib.uses_target_compiler(hw)
  fake = not native and devices > jax.device_count()
  print(f'config      {cfg.name}')
  print(f'target      {where}' + (f', {_gib(budget)} usable by the step' if budget else ''))
  if hw is not None and not native:
    print(f'compiler    {targets.missing(hw)}')
  print(f'compiling   on {devices} ' + (
      f'compile-only {hw.platform.upper()} devices ({hw.topology}) in a child process' if native
      else 'fake CPU devices in a child process' if fake else
      f'{jax.devices()[0].platform} devices') + ' ...', flush=True)
  compiler = ['XLA']

  def report(e):
    if e['event'] == 'first':
      compiler[0] = e['compiler']
      print(f"compiler    {e['compiler']}")
      n = e['n_params']
      print(f'parameters  {n:,} ' + (f'({n / 1e9:.2f}B)' if n >= 1e8 else f'({n / 1e6:.2f}M)'))
      if cfg.model.moe_experts:
        active = metrics_lib.active_params(cfg.model, e['n_params'])
        print(f'active      {active:,} ({active / 1e9:.2f}B) per token: top '
              f'{cfg.model.moe_top_k} of {cfg.model.moe_experts} experts (MFU counts these)')
      print(f"params      {_gib(e['params'])} total, {_gib(e['params_per_device'])} per device")
      print(f"opt state   {_gib(e['opt_state'])} total, "
            f"{_gib(e['opt_state_per_device'])} per device")
    if e['event'] == 'note':
      print(f"note        {e['message']}")
    if e['event'] in ('first', 'trial'):
      if 'total' not in e:
        print('compiled    no memory analysis from this backend')
        return
      verdict = '' if budget is None else ('  fits' if e['total'] <= budget else '  does not fit')
      print(f"compiled    grad_accum {e['grad_accum']}, remat {e['remat']} "
            f"({e['per_device_batch']} x {cfg.data.seq_len} tokens per device): "
            f"args {_gib(e['args'])} + temp {_gib(e['temp'])} + outputs {_gib(e['outputs'])}"
            f" = {_gib(e['total'])} per device ({compiler[0].split(',')[0]}){verdict}",
            flush=True)
      _print_traffic(e)
    elif e['event'] == 'choice':
      print(f"fits        with --config.train.grad_accum={e['grad_accum']}"
            + (f" --config.model.remat={e['remat']}" if e['remat'] != cfg.model.remat else ''))
    elif e['event'] == 'none':
      print('fits        no: not even at one sequence per device with remat full '
            '(shard more: mesh.tensor, mesh.sequence, or more devices)')

  plan_lib.run(cfg, devices, budget, report, hw if native else None)
  return 0
