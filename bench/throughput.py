"""Training throughput of a config on whatever accelerator is present.

Runs the real jitted train step (``Setup`` of jaxlm.engine.build, the config's
mesh, dtypes, remat and attention kernel) on pre-made random batches and
prints tokens/s/device, step time, MFU and peak device memory. Timing: median
of ``--repeats`` timings of ``--steps`` steps, after compile and ``--warmup``
steps.

    .venv/bin/python bench/throughput.py --config=configs/llama_1b.py
    .venv/bin/python bench/throughput.py --config=configs/llama_8b.py \\
        --config.train.batch_size=8 --config.model.remat=full --steps=10

On GPU, run it under the XLA flags that launch/gpu_single_host.sh sets:
``eval "$(launch/gpu_single_host.sh --print-env)"`` first.
MFU uses ``jaxlm.run.metrics.flops_per_token`` (6N + attention) and the
per-device peak from ``device_peak_flops`` (``--config.train.peak_flops`` to
override).
"""

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))

import jax  # noqa: E402

from step_speed import measure  # noqa: E402

from jaxlm import configs  # noqa: E402
from jaxlm.cli import main as cli  # noqa: E402
from jaxlm.run import runtime  # noqa: E402
from jaxlm.run.metrics import device_peak_flops, flops_per_token, matmul_params  # noqa: E402


def peak_memory_bytes(setup) -> tuple[int, str]:
  """(bytes, how measured): the allocator's peak on GPU/TPU, XLA's estimate elsewhere."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'allocator peak'
  mem = setup.train_step_memory()
  if mem is None:
    return 0, 'unknown'
  return (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes), 'XLA estimate: args + temps + outputs - donated'


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--config', required=True, help='config file, e.g. configs/llama_1b.py')
  ap.add_argument('--steps', type=int, default=10, help='steps per timing')
  ap.add_argument('--repeats', type=int, default=3, help='timings; the median is reported')
  ap.add_argument('--warmup', type=int, default=3, help='steps after compile, untimed')
  ap.add_argument('--json', default='', help='also append the result as a JSON line to this file')
  args, rest = ap.parse_known_args(argv)
  cfg = cli.override(configs.load(args.config), rest)
  runtime.initialize()

  tok_s, rates, compile_s, setup = measure(cfg, args.steps, args.repeats, warmup=args.warmup)
  n_dev = jax.device_count()
  m = cfg.model
  flops = flops_per_token(m, matmul_params(m, setup.n_params), cfg.data.seq_len)
  peak = device_peak_flops(cfg.train.peak_flops)
  tok_step = cfg.train.batch_size * cfg.data.seq_len
  mem, how = peak_memory_bytes(setup)
  result = {
      'config': Path(args.config).name, 'devices': n_dev,
      'device_kind': jax.devices()[0].device_kind, 'params': setup.n_params,
      'tokens_per_step': tok_step, 'tokens_per_sec': tok_s,
      'tokens_per_sec_per_device': tok_s / n_dev, 'step_ms': tok_step / tok_s * 1e3,
      'mfu': tok_s * flops / (peak * n_dev), 'peak_memory_gib': mem / 2**30,
      'compile_s': compile_s,
  }
  print(f"{result['config']} {' '.join(rest)}: {setup.n_params:,} params, "
        f'{m.n_layers}L d_model {m.d_model}, batch {cfg.train.batch_size} x {cfg.data.seq_len}, '
        f'compute {m.dtype}, attention {m.attention}, remat {m.remat}, mesh {dict(setup.mesh.shape)}')
  print(f"{n_dev} x {result['device_kind']} (backend {jax.default_backend()}); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f'compile + first step: {compile_s:.1f} s; tokens/s per timing: '
        + ', '.join(f'{r:,.0f}' for r in rates))
  print(f"step {result['step_ms']:.1f} ms; {tok_s:,.0f} tokens/s = "
        f"{result['tokens_per_sec_per_device']:,.0f} tokens/s/device; "
        f"MFU {100 * result['mfu']:.1f}% ({flops / 1e9:.2f} GFLOP/token, peak "
        f'{peak / 1e12:,.1f} TFLOP/s/device); peak memory {result["peak_memory_gib"]:.2f} GiB '
        f'per device ({how})')
  if args.json:
    with open(args.json, 'a', encoding='utf-8') as f:
      f.write(json.dumps({**result, 'overrides': rest}) + '\n')
  return result


if __name__ == '__main__':
  main()
