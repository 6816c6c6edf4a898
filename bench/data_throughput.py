"""Tokens/s of the input pipeline alone, against what a gpt2_small training step consumes on CPU.

    .venv/bin/python bench/data_throughput.py [--batches=8 --repeats=5 --workers=0]

Loader: `DataPipeline.train_iterator()` with configs/gpt2_small.py's data shape
(batch 512 x seq 1024, shuffled), timed over `--batches` batches after one
warm-up batch, median of `--repeats` timings, on two sources:
  * a `jaxlm prepare` store of ../shared/data/tinyshakespeare.txt (byte tokenizer,
    one document per line, EOS added while reading, or stored by prepare with
    --stored_eos; made in a temp dir), read window by window from its shards, and
  * data.source='pystdlib' (this Python's stdlib .py files, byte tokenizer), read
    and tokenized whole at construction.
Construction is reported apart. Besides wall-clock tokens/s, each timing's rate
per CPU second of this process is printed: on a shared machine other processes
slow the wall clock, not the CPU time.

Consumption (an estimate, not a measured step): a gpt2_small step on this CPU
takes at least tokens/step * FLOPs/token / P seconds, where FLOPs/token is
`jaxlm.run.metrics.flops_per_token` (6N + attention, N = matmul parameters)
and P is `measured_cpu_peak()` (a jitted fp32 1024^3 matmul). That assumes
100% MFU, so the consumption rate P / (FLOPs/token) is an upper bound and the
reported loader/step ratio a lower bound.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from jaxlm.configs import gpt2_small as gpt2_small_config  # noqa: E402
from jaxlm.data.pipeline import DataPipeline  # noqa: E402
from jaxlm.data.prepare import prepare  # noqa: E402
from jaxlm.data.tokenizers import ByteTokenizer  # noqa: E402
from jaxlm.engine.build import Setup  # noqa: E402
from jaxlm.run import metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt'


def gpt2_small():
  return gpt2_small_config.get_config()


def loader_rate(cfg, batches: int, repeats: int):
  """(median tokens/s, per-timing tokens/s, construction s, median tokens/CPU s) of `cfg`."""
  t0 = time.perf_counter()
  pipe = DataPipeline(cfg, ByteTokenizer())
  build_s = time.perf_counter() - t0
  it = pipe.train_iterator()
  try:
    next(it)  # warm-up: worker start, first read-ahead
    tokens = batches * pipe.local_batch * pipe.seq_len
    rates, cpu_rates = [], []
    for _ in range(repeats):
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(batches):
        next(it)
      rates.append(tokens / (time.perf_counter() - t0))
      cpu_rates.append(tokens / (time.process_time() - c0))
  finally:
    if hasattr(it, 'close'):
      it.close()
  return statistics.median(rates), rates, build_s, statistics.median(cpu_rates)


def step_consumption(cfg) -> tuple:
  """(tokens/s a gpt2_small step consumes at 100% MFU on this CPU, FLOPs/token, CPU FLOP/s)."""
  n_params = Setup(cfg).n_params  # abstract init: shapes only, nothing allocated
  flops = metrics.flops_per_token(cfg.model, metrics.matmul_params(cfg.model, n_params),
                                  cfg.data.seq_len)
  peak = metrics.measured_cpu_peak()
  return peak / flops, flops, peak


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batches', type=int, default=8, help='batches per timing')
  ap.add_argument('--repeats', type=int, default=5, help='timings; the median is reported')
  ap.add_argument('--workers', type=int, default=0, help='data.worker_count')
  ap.add_argument('--stored_eos', action='store_true',
                  help='prepare with --add_eos, so the loader inserts no EOS while reading')
  args = ap.parse_args(argv)

  base = gpt2_small()
  base.data.tokenizer, base.data.tokenizer_path = 'byte', ''
  base.data.worker_count = args.workers
  print(f'loader: batch {base.train.batch_size} x seq {base.data.seq_len} (gpt2_small), '
        f'shuffle, data.worker_count={args.workers}, {os.cpu_count()} CPUs')
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    m = prepare(str(SHAKESPEARE), Path(tmp) / 'store', text_unit='line', docs_per_shard=10000,
                add_eos=args.stored_eos,
                workers=0)
    print(f"prepare tinyshakespeare: {m['tokens']:,} tokens in {len(m['shards'])} shards, "
          f'{time.perf_counter() - t0:.2f} s')
    for name, source, path in (('prepared store (tinyshakespeare)', 'arrayrecord',
                                str(Path(tmp) / 'store')), ('pystdlib', 'pystdlib', '')):
      cfg = base.copy_and_resolve_references()
      cfg.data.source, cfg.data.path = source, path
      rate, rates, build_s, cpu_rate = loader_rate(cfg, args.batches, args.repeats)
      results[name] = rate
      print(f'{name}: open {build_s:.2f} s; tokens/s per timing: '
            + ', '.join(f'{r / 1e6:.1f}M' for r in rates) + f'; median {rate / 1e6:.1f}M tokens/s'
            f' ({cpu_rate / 1e6:.1f}M per CPU second)')

  need, flops, peak = step_consumption(base)
  print(f'gpt2_small step: {flops / 1e9:.3f} GFLOP/token; measured CPU matmul peak '
        f'{peak / 1e9:.1f} GFLOP/s -> at most {need:,.1f} tokens/s consumed '
        f'({base.train.batch_size * base.data.seq_len / need:,.0f} s/step at 100% MFU)')
  for name, rate in results.items():
    print(f'ratio loader/step, {name}: {rate / need:,.0f}x (target >= 10x)')
  return 0 if all(rate / need >= 10 for rate in results.values()) else 1


if __name__ == '__main__':
  sys.exit(main())
