"""Raw jitted train-step speed of jaxlm on pre-made device arrays (no data pipeline).

Default model: the nanoGPT shakespeare_char equivalent (GPT-2 style, 4 layers,
4 heads, 128 dims, context 64, batch 12, no bias, tied embeddings). Prints
tokens/s as the median over ``--repeats`` timings of ``--steps`` steps each.

    .venv/bin/python bench/step_speed.py
    .venv/bin/python bench/step_speed.py --config.model.scan_layers=False
    XLA_FLAGS=--xla_cpu_use_thunk_runtime=false .venv/bin/python bench/step_speed.py

``--config=PATH`` benchmarks another config file; ``--config.x.y=v`` overrides a field.
"""

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import configs  # noqa: E402
from jaxlm.cli import main as cli  # noqa: E402
from jaxlm.engine.build import Setup  # noqa: E402
from jaxlm.run import runtime  # noqa: E402
from jaxlm.run.metrics import flops_per_token, matmul_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def fake_batch(cfg, rng):
  """One packed batch of random byte tokens, as the pipeline makes: [batch, length] each."""
  b, t = cfg.train.batch_size, cfg.data.seq_len
  toks = rng.integers(0, 256, (b, t + 1), dtype=np.int32)
  return {'inputs': toks[:, :-1], 'targets': toks[:, 1:],
          'segment_ids': np.ones((b, t), np.int32),
          'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          'loss_mask': np.ones((b, t), np.float32)}


def time_steps(setup, state, batches, steps):
  """Runs ``steps`` train steps (cycling through device batches); returns (seconds, state)."""
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = setup.train_step(state, batches[i % len(batches)])
  jax.block_until_ready((state, m))
  return time.perf_counter() - t0, state


def measure(cfg, steps: int, repeats: int, warmup: int = 5):
  """Returns (tokens/s median, per-repeat tokens/s list, compile seconds, setup)."""
  if runtime.cpu_only():
    runtime.reuse_host_memory()  # as `jaxlm train` does (runtime.initialize)
  setup = Setup(cfg)
  rng = np.random.default_rng(0)
  batches = [setup.device_batch(fake_batch(cfg, rng)) for _ in range(4)]
  state = setup.init_state()
  t0 = time.perf_counter()
  _, state = time_steps(setup, state, batches, 1)
  compile_s = time.perf_counter() - t0
  _, state = time_steps(setup, state, batches, warmup)
  tokens = cfg.train.batch_size * cfg.data.seq_len * steps
  rates, cpu, faults = [], [], []
  for _ in range(repeats):
    c0, f0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    secs, state = time_steps(setup, state, batches, steps)
    cpu.append((time.process_time() - c0) / steps)
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
    rates.append(tokens / secs)
  measure.cpu_s_per_step = statistics.median(cpu)
  measure.faults_per_step = statistics.median(faults)
  return statistics.median(rates), rates, compile_s, setup


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--config', default='shakespeare_char_nanogpt',
                  help='config name or file (default: nanoGPT\'s CPU model and batch)')
  ap.add_argument('--steps', type=int, default=50, help='steps per timing')
  ap.add_argument('--repeats', type=int, default=7, help='timings; the median is reported')
  args, rest = ap.parse_known_args(argv)
  cfg = configs.load(args.config)
  cfg = cli.override(cfg, rest)

  tok_s, rates, compile_s, setup = measure(cfg, args.steps, args.repeats)
  m = cfg.model
  flops = flops_per_token(m, matmul_params(m, setup.n_params), cfg.data.seq_len)
  tok_step = cfg.train.batch_size * cfg.data.seq_len
  print(f'model: {setup.n_params:,} params, {m.n_layers}L/{m.n_heads}H/{m.d_model}d, '
        f'{m.position}/{m.norm}/{m.activation}, scan_layers={m.scan_layers}, '
        f'attention={m.attention}; batch {cfg.train.batch_size} x seq {cfg.data.seq_len}')
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; devices {jax.devices()}")
  print(f'compile+first step: {compile_s:.2f} s')
  print('tokens/s per timing: ' + ', '.join(f'{r:,.0f}' for r in rates))
  print(f'median: {tok_s:,.0f} tokens/s = {tok_step / tok_s * 1e3:.2f} ms/step '
        f'= {tok_s * flops / 1e9:.1f} GFLOP/s (model FLOPs, {flops / 1e6:.2f} MFLOP/token)')
  print(f'process CPU time: {measure.cpu_s_per_step * 1e3:.1f} ms/step (all threads; '
        f'less sensitive than wall time to other load on the host); '
        f'{measure.faults_per_step:,.0f} page faults/step')
  return tok_s


if __name__ == '__main__':
  sys.exit(0 if main() else 1)
