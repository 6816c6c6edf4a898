"""Steady-state overhead of the jaxlm train loop over a bare jitted step.

Loop: ``Trainer(cfg, workdir).run()`` -- what ``jaxlm train`` runs -- with the
real data pipeline, metrics every ``train.log_every`` steps (metrics.jsonl,
tensorboard, progress bar) and async Orbax checkpoints every 100 steps. A hook
waits for the state and stamps the wall clock at step ``--warmup`` and at the
last step; tokens/s is taken between them, so checkpoint and logging time are
counted (the
loop's own ``train/tokens_per_sec`` leaves checkpoint time out; its median is
printed too).

Bare: the same Setup's jitted train step on pre-made device arrays (real
batches from the same pipeline), nothing else.

Runs alternate bare/loop ``--repeats`` times; medians and their ratio are printed.

    .venv/bin/python bench/overhead.py
    .venv/bin/python bench/overhead.py --steps=400 --config.train.log_every=10
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))

import jax  # noqa: E402

from step_speed import time_steps  # noqa: E402

from jaxlm import configs  # noqa: E402
from jaxlm.cli import main as cli  # noqa: E402
from jaxlm.data.pipeline import make_pipeline  # noqa: E402
from jaxlm.engine.build import Setup  # noqa: E402
from jaxlm.evals.hooks import Hook  # noqa: E402
from jaxlm.run import runtime  # noqa: E402
from jaxlm.run.loop import Trainer  # noqa: E402


def loop_tokens_per_sec(cfg, warmup: int) -> tuple[float, float]:
  """(tokens/s over steps warmup..end by wall clock, median metrics.jsonl tokens/s after warmup)."""
  stamps = {}
  workdir = tempfile.mkdtemp(prefix='jaxlm_overhead_')
  trainer = Trainer(cfg, workdir)

  def clock(ctx):
    # Dispatch is asynchronous: the loop can run dozens of steps ahead of the
    # computation, so both ends of the timed window wait for the state first.
    if ctx.step in (warmup, cfg.train.steps):
      jax.block_until_ready(ctx.state)
      stamps[ctx.step] = time.perf_counter()

  trainer.add_hook(Hook(clock, every=1, at_end=False, name='clock'))
  trainer.run()
  last = max(stamps)
  tokens = cfg.train.batch_size * cfg.data.seq_len * (last - warmup)
  wall = tokens / (stamps[last] - stamps[warmup])
  rows = [json.loads(l) for l in Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  shutil.rmtree(workdir)  # checkpoints of repeated runs add up
  logged = [r['train/tokens_per_sec'] for r in rows
            if 'train/tokens_per_sec' in r and r['step'] > warmup]
  return wall, statistics.median(logged)


def bare_tokens_per_sec(cfg, steps: int) -> float:
  """Tokens/s of the jitted step alone on pre-made device batches (after 10 warm-up steps)."""
  setup = Setup(cfg)
  it = make_pipeline(cfg).train_iterator()
  batches = [setup.device_batch(next(it)) for _ in range(8)]
  state = setup.init_state()
  _, state = time_steps(setup, state, batches, 10)
  secs, _ = time_steps(setup, state, batches, steps)
  return cfg.train.batch_size * cfg.data.seq_len * steps / secs


def loop_bench_args(argv, doc: str, steps: int, warmup: int, **extra):
  """(args, --config.x overrides, config) for the loop benchmarks; ``extra``: name=(default, help)."""
  ap = argparse.ArgumentParser(description=doc.splitlines()[0])
  ap.add_argument('--config', default='shakespeare_char')
  ap.add_argument('--steps', type=int, default=steps, help='loop steps per run')
  ap.add_argument('--warmup', type=int, default=warmup, help='loop steps before timing starts')
  ap.add_argument('--repeats', type=int, default=3, help='alternating runs of each kind')
  for name, (default, help_) in extra.items():
    ap.add_argument(f'--{name}', type=int, default=default, help=help_)
  args, rest = ap.parse_known_args(argv)
  os.chdir(REPO)  # the config's data.path is relative to the repo root
  return args, rest, configs.load(args.config)


def main(argv=None):
  args, rest, cfg = loop_bench_args(argv, __doc__, steps=300, warmup=50)
  cfg.train.steps = args.steps
  cfg.checkpoint.every = 100
  cfg.checkpoint.async_save = True
  cfg.eval.every = 0  # eval is not part of the steady state; the final one runs after timing
  cfg = cli.override(cfg, rest)
  runtime.initialize()

  bare, loop, logged = [], [], []
  for r in range(args.repeats):
    bare.append(bare_tokens_per_sec(cfg, args.steps - args.warmup))
    w, l = loop_tokens_per_sec(cfg, args.warmup)
    loop.append(w)
    logged.append(l)
    print(f'run {r}: bare {bare[-1]:,.0f} tok/s, loop {w:,.0f} tok/s (wall clock), '
          f'loop metrics.jsonl median {l:,.0f} tok/s', flush=True)
  b, lw, ll = statistics.median(bare), statistics.median(loop), statistics.median(logged)
  m = cfg.model
  print(f'model {m.n_layers}L/{m.n_heads}H/{m.d_model}d, batch {cfg.train.batch_size} x '
        f'{cfg.data.seq_len}; log_every {cfg.train.log_every}, async checkpoints every '
        f'{cfg.checkpoint.every}; steps {args.warmup}..{args.steps} timed; {jax.devices()}')
  print(f'median bare step: {b:,.0f} tokens/s')
  print(f'median jaxlm loop: {lw:,.0f} tokens/s (wall clock incl. checkpoints); '
        f'metrics.jsonl: {ll:,.0f}')
  print(f'ratio loop / bare: {lw / b:.3f} (wall clock), {ll / b:.3f} (metrics.jsonl)')
  return lw / b


if __name__ == '__main__':
  main()
