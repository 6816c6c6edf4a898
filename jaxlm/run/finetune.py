"""``jaxlm finetune``: supervised fine-tuning on {prompt, response} pairs, on the train loop.

  jaxlm finetune --workdir=OUT --init_from=WORKDIR_OR_HF_DIR --data=pairs.jsonl
                 [--eval_data=pairs_val.jsonl --eval_every=0]
                 [--steps=200 --batch_size=8 --seq_len=256 --lr=1e-5 --warmup_steps=10]

A fine-tune is a training run: the source run's config (or an HF model's) with
these flags applied, ``data.source='pairs'`` (jaxlm.data.pairs: loss on
response tokens only) and ``train.init_from`` (jaxlm.engine.warm_start: its
parameters, a fresh optimizer and schedule). ``jaxlm.run.loop.Trainer`` runs
it, so a fine-tune has everything ``jaxlm train`` has: SIGTERM/SIGINT stop it
with a checkpoint and exit 75, rerunning the same command resumes it, the
divergence guard, the workdir lock, hooks, checkpoints, and ``eval/loss`` on
``--eval_data`` (held-out pairs). OUT gets config.json, metrics.jsonl and
checkpoints like any run; ``jaxlm train --config=OUT/config.json`` is the same run.
"""

import logging

from absl import flags

from jaxlm.core import config as config_lib
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import storage
from jaxlm.core.errors import EXIT_OK, EXIT_PREEMPTED, ConfigError
from jaxlm.data import pairs
from jaxlm.engine.build import config_from_hf, is_workdir
from jaxlm.hf import weights as hf
from jaxlm.run import lock, runtime
from jaxlm.run.loop import Trainer

log = logging.getLogger('jaxlm')
USAGE = '''usage: jaxlm finetune --workdir=OUT --init_from=WORKDIR_OR_HF_DIR --data=pairs.jsonl
                      [--eval_data=pairs_val.jsonl --eval_every=0] [--restore_step=N]
                      [--steps=100 --batch_size=8 --seq_len=0 --lr=1e-5 --warmup_steps=10]

Supervised fine-tuning on the train loop (loss on response tokens only); exit codes as
`jaxlm train --help` (75: stopped by a signal with a checkpoint; rerun to resume).
'''


def define_flags(fv) -> None:
  flags.DEFINE_string('workdir', None, 'output run directory (rerun to resume)', flag_values=fv)
  flags.DEFINE_string('init_from', None, 'jaxlm workdir or Hugging Face model directory',
                      flag_values=fv)
  flags.DEFINE_integer('restore_step', None, 'checkpoint step of --init_from (default: latest)',
                       flag_values=fv)
  flags.DEFINE_string('data', None, 'JSONL of {"prompt": ..., "response": ...}', flag_values=fv)
  flags.DEFINE_string('eval_data', '', 'held-out pairs JSONL, scored as eval/loss',
                      flag_values=fv)
  flags.DEFINE_integer('eval_every', 0, 'steps between --eval_data evals (0 = at the end only)',
                       flag_values=fv)
  flags.DEFINE_integer('steps', 100, 'optimizer steps', flag_values=fv)
  flags.DEFINE_integer('batch_size', 8, 'rows per step', flag_values=fv)
  flags.DEFINE_integer('seq_len', 0, 'tokens per row (0 = the init run\'s data.seq_len)',
                       flag_values=fv)
  flags.DEFINE_float('lr', 1e-5, 'peak learning rate', flag_values=fv)
  flags.DEFINE_integer('warmup_steps', 10, 'linear warmup steps', flag_values=fv)
  flags.DEFINE_integer('log_every', 10, 'steps between metric lines', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'row shuffle seed', flag_values=fv)
  lock.define_flags(fv)


def run(fv, args) -> int:
  if args:
    raise ConfigError(f"jaxlm finetune takes no positional arguments (got {' '.join(args)})")
  for name in ('workdir', 'init_from', 'data'):
    if not getattr(fv, name):
      raise ConfigError(f'--{name} is required')
  runtime.initialize()
  with lock.WorkdirLock(fv.workdir, stale_after=fv.lock_timeout, force=fv.force_unlock) as held:
    cfg = finetune_config(fv.init_from, fv.data, restore_step=fv.restore_step, steps=fv.steps,
                          batch_size=fv.batch_size, seq_len=fv.seq_len, lr=fv.lr,
                          warmup_steps=fv.warmup_steps, log_every=fv.log_every, seed=fv.seed,
                          eval_data=fv.eval_data, eval_every=fv.eval_every)
    trainer = Trainer(cfg, fv.workdir)
    trainer.add_hook(held.hook())
    summary = trainer.run()
  if runtime.is_main() and 'train/loss' in summary:
    extra = f", eval/loss {summary['eval/loss']:.4f}" if 'eval/loss' in summary else ''
    print(f"step {summary['step']}: train/loss {summary['train/loss']:.4f}{extra}")
  return EXIT_PREEMPTED if summary['stopped_early'] else EXIT_OK


def source_config(init_from: str):
  """The config of a jaxlm workdir, or base + the model fields of an HF directory."""
  if is_workdir(init_from):
    return config_lib.load_saved(init_from)
  if (storage.path(init_from) / 'config.json').is_file():
    hf_cfg, _ = hf.read_dir(init_from)
    return config_from_hf(init_from, hf_cfg)
  raise ConfigError(f"--init_from '{init_from}' is neither a jaxlm workdir (config.json + "
                    'checkpoints/) nor a Hugging Face model directory')


def finetune_config(init_from: str, data: str, restore_step: int | None = None, steps: int = 100,
                    batch_size: int = 8, seq_len: int = 0, lr: float = 1e-5,
                    warmup_steps: int = 10, log_every: int = 10, seed: int = 0,
                    eval_data: str = '', eval_every: int = 0):
  """The fine-tune's full config: the source's, with supervised data and a fresh schedule.

  The same arguments give the same config, so rerunning a command resumes its run.
  """
  pairs.load_pairs(data, '--data')  # bad data is named before any model is read
  if eval_data:
    pairs.load_pairs(eval_data, '--eval_data')
  cfg = source_config(init_from).copy_and_resolve_references()
  mesh_lib.fit_to_host(cfg)  # the source may have trained on another host shape
  with cfg.unlocked():
    cfg.name = f'{cfg.name}-sft'
    cfg.data.source, cfg.data.path, cfg.data.eval_path = 'pairs', data, eval_data
    cfg.data.mixture, cfg.data.seed = '', seed
    cfg.train.steps, cfg.train.batch_size, cfg.train.grad_accum = steps, batch_size, 1
    cfg.train.log_every = log_every
    cfg.train.init_from = init_from
    cfg.train.init_from_step = -1 if restore_step is None else restore_step
    cfg.optim.lr, cfg.optim.warmup_steps = lr, min(warmup_steps, steps)
    cfg.optim.decay_steps = 0  # the schedule spans the fine-tuning steps, not the pretraining run's
    cfg.eval.every, cfg.eval.batch_size = eval_every, 0
    if seq_len:
      cfg.data.seq_len = seq_len
  config_lib.validate(cfg)
  return cfg
