"""``jaxlm finetune``: supervised fine-tuning on {prompt, response} pairs.

  jaxlm finetune --workdir=OUT --init_from=WORKDIR_OR_HF_DIR --data=pairs.jsonl
                 [--steps=200 --batch_size=8 --seq_len=256 --lr=1e-5 --warmup_steps=10]

Parameters come from a jaxlm workdir (params-only restore) or a Hugging Face
directory; the optimizer state is fresh. Each pair becomes one document
``prompt + response + EOS``; documents are packed into rows with segment ids
(so they never attend to each other) and the loss mask is 1 only on targets
that are response tokens or the EOS. The train step is ``Setup``'s, unchanged.
OUT gets config.json, metrics.jsonl and checkpoints like a training run.
"""

import json
import logging
from pathlib import Path

import jax
import numpy as np
from absl import flags

from jaxlm import config as config_lib
from jaxlm import lock, storage
from jaxlm.checkpoint import Checkpointer
from jaxlm.data.packing import batch_from_documents
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.engine import Setup, load
from jaxlm.errors import ConfigError, DataError
from jaxlm.train import metrics as metrics_lib
from jaxlm.train.step import new_state

log = logging.getLogger('jaxlm')


def define_flags(fv) -> None:
  flags.DEFINE_string('workdir', None, 'output run directory', flag_values=fv)
  flags.DEFINE_string('init_from', None, 'jaxlm workdir or Hugging Face model directory',
                      flag_values=fv)
  flags.DEFINE_integer('restore_step', None, 'checkpoint step of --init_from (default: latest)',
                       flag_values=fv)
  flags.DEFINE_string('data', None, 'JSONL of {"prompt": ..., "response": ...}', flag_values=fv)
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
  with lock.WorkdirLock(fv.workdir, stale_after=fv.lock_timeout, force=fv.force_unlock) as held:
    summary = finetune(fv.init_from, fv.data, fv.workdir, restore_step=fv.restore_step,
                       steps=fv.steps, batch_size=fv.batch_size, seq_len=fv.seq_len, lr=fv.lr,
                       warmup_steps=fv.warmup_steps, log_every=fv.log_every, seed=fv.seed,
                       heartbeat=held.heartbeat)
  print(f"step {summary['step']}: train/loss {summary['train/loss']:.4f}")
  return 0


def load_pairs(path: str) -> list[tuple[str, str]]:
  """(prompt, response) pairs from a JSONL file; DataError names a bad line."""
  p = Path(path)
  if not p.is_file():
    raise DataError(f"--data '{path}' does not exist")
  pairs = []
  for n, line in enumerate(p.read_text(encoding='utf-8').splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      pairs.append((rec['prompt'], rec['response']))
      assert isinstance(pairs[-1][0], str) and isinstance(pairs[-1][1], str)
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
      raise DataError(f"--data '{path}' line {n}: expected "
                      '{"prompt": str, "response": str}') from None
  if not pairs:
    raise DataError(f"--data '{path}' has no examples")
  return pairs


def encode_pair(tokenizer, prompt: str, response: str, add_bos: bool = False):
  """(ids [n], response_mask [n]): mask 1 on response tokens and the EOS."""
  p = [int(t) for t in tokenizer.encode(prompt)]
  r = [int(t) for t in tokenizer.encode(response)]
  if add_bos and tokenizer.bos_id is not None:
    p = [tokenizer.bos_id] + p
  if tokenizer.eos_id is not None:
    r = r + [tokenizer.eos_id]
  return np.asarray(p + r, np.int32), np.asarray([0] * len(p) + [1] * len(r), np.float32)


def pack_rows(examples, seq_len: int) -> dict[str, np.ndarray]:
  """Packs (ids, response_mask) documents into rows; each key [rows, seq_len].

  A document of n tokens gives n-1 (input, target) pairs; the loss mask of a
  pair is the response mask of its target. Documents longer than seq_len + 1
  keep their last seq_len + 1 tokens (the response end matters most).
  """
  rows, cur, used = [], [], 0
  for ids, mask in examples:
    ids, mask = ids[-(seq_len + 1):], mask[-(seq_len + 1):]
    if cur and used + len(ids) - 1 > seq_len:
      rows.append(cur)
      cur, used = [], 0
    cur.append((ids, mask[1:]))
    used += len(ids) - 1
  rows.append(cur)
  return batch_from_documents(rows, seq_len)


def finetune(init_from: str, data: str, workdir: str, restore_step: int | None = None,
             steps: int = 100, batch_size: int = 8, seq_len: int = 0, lr: float = 1e-5,
             warmup_steps: int = 10, log_every: int = 10, seed: int = 0,
             heartbeat=None) -> dict:
  """Fine-tunes and checkpoints into ``workdir``; returns the last metrics.

  ``heartbeat``: called after every step (the workdir lock's refresh; cheap).
  """

  if (storage.path(workdir) / 'checkpoints').exists():
    raise ConfigError(f"workdir '{workdir}' already holds checkpoints (use a new --workdir)")
  pairs = load_pairs(data)
  loaded = load(init_from, restore_step)
  cfg = loaded.cfg
  with cfg.unlocked():
    cfg.name = f'{cfg.name}-sft'
    cfg.train.steps, cfg.train.batch_size, cfg.train.grad_accum = steps, batch_size, 1
    cfg.train.log_every = log_every
    cfg.optim.lr, cfg.optim.warmup_steps = lr, min(warmup_steps, steps)
    cfg.optim.decay_steps = 0  # the schedule spans the fine-tuning steps, not the pretraining run's
    if seq_len:
      cfg.data.seq_len = seq_len
  config_lib.validate(cfg, need_data=False)
  setup = Setup(cfg, loaded.setup.mesh)  # new optimizer and schedule, same mesh and model
  tokenizer = get_tokenizer(cfg.data)
  rows = pack_rows([encode_pair(tokenizer, p, r, cfg.data.add_bos) for p, r in pairs],
                   cfg.data.seq_len)
  n_rows = len(rows['inputs'])
  log.info('finetune: %d pairs -> %d rows of %d tokens, %d response tokens', len(pairs), n_rows,
           cfg.data.seq_len, int(rows['loss_mask'].sum()))

  params = loaded.params
  opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
  state = new_state(params, opt_state)
  config_lib.save(cfg, workdir)
  writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
  ckpt = Checkpointer(workdir, cfg.checkpoint)
  rng = np.random.default_rng(seed)
  order = np.empty(0, np.int64)
  last = {}
  lo = batch_size // jax.process_count() * jax.process_index()
  hi = lo + batch_size // jax.process_count()
  for step in range(1, steps + 1):
    while len(order) < batch_size:  # a fresh permutation per pass over the rows
      order = np.concatenate([order, rng.permutation(n_rows)])
    idx, order = order[:batch_size], order[batch_size:]
    batch = setup.device_batch({k: v[idx][lo:hi] for k, v in rows.items()})
    state, m = setup.train_step(state, batch)
    if heartbeat is not None:
      heartbeat()
    if step % log_every == 0 or step == steps or step == 1:
      m = jax.device_get(m)
      last = {'train/loss': float(m['loss']), 'train/lr': float(m['lr']),
              'train/grad_norm': float(m['grad_norm'])}
      writer.write(step, last)
      log.info('finetune: step %d loss %.4f', step, last['train/loss'])
    if step == steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
      ckpt.save(step, state, None, force=step == steps)
  ckpt.wait()
  ckpt.close()
  writer.close()
  return {'step': steps, **last}
