"""Step time of the train loop with async checkpoints, sync checkpoints and none.

Runs ``Trainer(cfg, workdir).run()`` (what ``jaxlm train`` runs) three ways,
alternating, ``--repeats`` times each:

- ``none``: ``checkpoint.every=0`` (only the final save, after the timed steps),
- ``async``: a checkpoint every ``--every`` steps, ``checkpoint.async_save=True``,
- ``sync``: the same with ``async_save=False`` (the loop waits for storage).

Tokens/s is wall clock between steps ``--warmup`` and the last, so the time a
save blocks the loop is counted; the time spent inside ``Checkpointer.save``
(how long the loop waits per save) is printed too. On a CPU-only host the
background write still competes with the step for the same cores, so async
cannot reach the ``none`` speed there; on GPU/TPU hosts it runs on idle host
cores. The default model is the shakespeare config
widened to d_model 512 and 6 layers (~19M params: a ~230 MB checkpoint with
Adam state) at batch 4 x 64, so that writing a checkpoint costs a few steps'
time on a CPU; ``--config.x.y=v`` changes any of it.

    .venv/bin/python bench/checkpoint_overhead.py
    .venv/bin/python bench/checkpoint_overhead.py --every=20 --steps=100 --repeats=5
"""

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))

import jax  # noqa: E402

from overhead import loop_bench_args, loop_tokens_per_sec  # noqa: E402

from jaxlm import configs  # noqa: E402
from jaxlm.checkpoint.checkpointer import Checkpointer  # noqa: E402
from jaxlm.cli import main as cli  # noqa: E402
from jaxlm.run import runtime  # noqa: E402

MODES = {'none': (0, True), 'async': (None, True), 'sync': (None, False)}
SAVE_SECONDS = []  # wall time of each Checkpointer.save call of the current run


def _timed(save):
  def wrapper(*args, **kwargs):
    t0 = time.perf_counter()
    try:
      return save(*args, **kwargs)
    finally:
      SAVE_SECONDS.append(time.perf_counter() - t0)
  return wrapper


def main(argv=None):
  args, rest, base = loop_bench_args(argv, __doc__, steps=60, warmup=10,
                                     every=(10, 'steps between checkpoints'))
  m = base.model
  m.d_model, m.n_heads, m.n_kv_heads, m.n_layers, m.mlp_dim = 512, 8, 8, 6, 1408
  base.train.steps = args.steps
  base.train.batch_size = 4
  base.train.log_every = 10
  base.eval.every = 0
  base = cli.override(base, rest)
  runtime.initialize()
  Checkpointer.save = _timed(Checkpointer.save)

  rates = {mode: [] for mode in MODES}
  blocked = {mode: [] for mode in MODES}
  for r in range(args.repeats):
    for mode, (every, async_save) in MODES.items():
      cfg = base.copy_and_resolve_references()
      cfg.checkpoint.every = args.every if every is None else every
      cfg.checkpoint.async_save = async_save
      SAVE_SECONDS.clear()
      wall, _ = loop_tokens_per_sec(cfg, args.warmup)
      rates[mode].append(wall)
      periodic = SAVE_SECONDS[:-1]  # the last is the final save, after the timed steps
      blocked[mode].extend(periodic)
      print(f'run {r} {mode:5s}: {wall:,.0f} tokens/s; {len(periodic)} saves, median '
            f'{statistics.median(periodic) if periodic else 0:.3f} s in save()', flush=True)
  med = {mode: statistics.median(v) for mode, v in rates.items()}
  tok_step = base.train.batch_size * base.data.seq_len
  print(f'model {m.n_layers}L/{m.n_heads}H/{m.d_model}d, batch {base.train.batch_size} x '
        f'{base.data.seq_len}; checkpoint every {args.every} steps; steps {args.warmup}..'
        f'{args.steps} timed; {args.repeats} runs each; {jax.devices()}')
  for mode, v in med.items():
    wait = f'; loop waits {statistics.median(blocked[mode]):.3f} s per save' if blocked[mode] else ''
    print(f'median {mode:5s}: {v:,.0f} tokens/s = {tok_step / v * 1e3:.1f} ms/step{wait}')
  print(f"step time async / none: {med['none'] / med['async']:.3f}; "
        f"sync / none: {med['none'] / med['sync']:.3f}")
  return med


if __name__ == '__main__':
  main()
