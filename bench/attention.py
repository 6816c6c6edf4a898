"""Attention kernels: compiled memory of forward and gradient, and step time, per kernel.

For each kernel, compiles ``attend`` and its gradient (w.r.t. q, k, v) on one
packed row of ``--len`` tokens (4 documents, GQA) and prints XLA's temp
memory (``compiled.memory_analysis()``) next to the fp32 [len, len] score
matrix, then times ``--repeats`` forward+backward calls. Kernels that cannot
run on this backend are listed with the reason. Compile-only (no timing):
``--no-time``.

    .venv/bin/python bench/attention.py --len=8192 --kernels=xla,chunked --no-time   # CPU memory
    JAX_PLATFORMS=cuda .venv/bin/python bench/attention.py --len=8192 --dtype=bfloat16 \\
        --kernels=xla,chunked,pallas_gpu,cudnn                                         # on a GPU
    JAX_PLATFORMS=cuda .venv/bin/python -m pytest -q tests/model/test_attention.py     # GPU equality
"""

import argparse
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.model import kernels  # noqa: E402
from jaxlm.model.attention import KERNELS, MaskInfo, attend  # noqa: E402


def _packed_row(t: int, docs: int = 4):
  seg = np.repeat(np.arange(1, docs + 1, dtype=np.int32), -(-t // docs))[:t][None]
  idx = np.arange(t, dtype=np.int32)[None]
  return MaskInfo(*(jnp.asarray(x) for x in (seg, seg, idx, idx)))


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--len', type=int, default=8192)
  p.add_argument('--heads', type=int, default=8)
  p.add_argument('--kv_heads', type=int, default=2)
  p.add_argument('--head_dim', type=int, default=64)
  p.add_argument('--chunk', type=int, default=512)
  p.add_argument('--window', type=int, default=0)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--kernels', default=','.join(KERNELS))
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--no-time', dest='time', action='store_false')
  a = p.parse_args()
  t, dt = a.len, jnp.dtype(a.dtype)
  m = _packed_row(t)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, t, a.heads, a.head_dim)), dt)
  k, v = (jnp.asarray(rng.normal(size=(1, t, a.kv_heads, a.head_dim)), dt) for _ in range(2))
  scores = t * t * a.heads * 4
  print(f'{jax.default_backend()} ({jax.devices()[0].device_kind}); len {t}, heads {a.heads}/'
        f'{a.kv_heads}, head_dim {a.head_dim}, {a.dtype}, window {a.window}; '
        f'fp32 score matrix {scores / 2**20:.0f} MiB')
  for impl in a.kernels.split(','):
    if impl in kernels.PLATFORM and kernels.mode(impl) is None:
      hint = '' if impl == 'cudnn' else f' (or {kernels.INTERPRET_ENV}=1: Pallas interpreter)'
      print(f'{impl:>10}: skipped, runs on {kernels.PLATFORM[impl].upper()} only{hint}')
      continue
    fwd = jax.jit(lambda q, k, v, impl=impl: attend(q, k, v, m, impl, a.chunk, a.window))
    grad = jax.jit(jax.grad(lambda q, k, v, impl=impl: attend(
        q, k, v, m, impl, a.chunk, a.window).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    line = f'{impl:>10}:'
    for name, f in (('forward', fwd), ('gradient', grad)):
      temp = f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
      line += f' {name} temp {temp / 2**20:9.1f} MiB;'
    if a.time:
      jax.block_until_ready(grad(q, k, v))
      start = time.perf_counter()
      for _ in range(a.repeats):
        jax.block_until_ready(grad(q, k, v))
      line += f' fwd+bwd {(time.perf_counter() - start) / a.repeats * 1e3:.1f} ms'
    print(line, flush=True)


if __name__ == '__main__':
  main()
