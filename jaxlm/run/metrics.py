"""FLOP accounting, MFU and the metric sinks (console, tensorboardX, metrics.jsonl)."""

import errno
import json
import math
import os
import sys
import time

import jax
import numpy as np

from jaxlm.core import storage
from jaxlm.core.errors import StorageError, fault_reason

# Dense peak FLOP/s per chip for bf16 (the dtype MFU is quoted in).
PEAK_FLOPS = {
    'h100': 989e12, 'h200': 989e12, 'a100': 312e12,
    'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5e': 197e12, 'tpu v5p': 459e12,
    'tpu v5': 459e12, 'tpu v6 lite': 918e12, 'tpu v6e': 918e12,
}
_CPU_PEAK_CACHE: dict[str, float] = {}


def flops_per_token(model_cfg, n_params: int, seq_len: int) -> float:
  """Training FLOPs per token: 6*N for the dense part + 12*layers*d*seq_len for attention.

  N excludes the (tied or not) input embedding lookup's zero-FLOP gather but
  keeps the output projection, as in PaLM's appendix B: 6N covers forward
  (2N) and backward (4N) matmuls; attention's QK^T and AV add
  2 * 2 * layers * seq_len * (heads * head_dim) forward, times 3 for backward.

  MoE: N is the *active* matmul parameter count (``matmul_params``): each
  token runs the router and top_k of the experts, so a MoE layer counts
  ``d*E + (top_k + shared) * 3*d*expert_mlp_dim``, not all E experts. MFU
  from it is the useful-work MFU that MoE papers quote; the dispatch
  (sort, all-to-all) is overhead and not counted.

  Sliding-window attention (``model.sliding_window`` = w) scores at most w keys per
  query, so the attention term uses min(w, seq_len) where full attention uses seq_len.
  """
  hd = model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
  attn_width = model_cfg.n_heads * hd
  window = model_cfg.get('sliding_window', 0)
  keys = min(window, seq_len) if window else seq_len
  return 6.0 * n_params + 12.0 * model_cfg.n_layers * attn_width * keys


def inactive_expert_params(model_cfg) -> int:
  """Expert parameters a token does not use: (experts - top_k) SwiGLU experts per MoE layer."""
  m = model_cfg
  if not m.moe_experts:
    return 0
  moe_layers = m.n_layers // m.moe_every
  per_expert = 3 * m.d_model * (m.moe_mlp_dim or m.mlp_dim)
  return moe_layers * (m.moe_experts - m.moe_top_k) * per_expert


def active_params(model_cfg, n_params: int) -> int:
  """Parameters one token uses (all of them for dense models, top_k experts for MoE)."""
  return n_params - inactive_expert_params(model_cfg)


def matmul_params(model_cfg, n_params: int) -> int:
  """Active parameters that take part in matmuls (drops position tables and unused experts)."""
  n_params = active_params(model_cfg, n_params)
  if model_cfg.position == 'learned':
    n_params -= model_cfg.max_seq_len * model_cfg.d_model
  if not model_cfg.tie_embeddings:
    n_params -= model_cfg.vocab_size * model_cfg.d_model  # input embedding is a gather
  return n_params


def measured_cpu_peak(n: int = 1024) -> float:
  """FLOP/s of a jitted fp32 n^3 matmul on this host (the CPU 'peak' for MFU)."""
  if 'cpu' in _CPU_PEAK_CACHE:
    return _CPU_PEAK_CACHE['cpu']
  import jax.numpy as jnp  # noqa: PLC0415
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  _CPU_PEAK_CACHE['cpu'] = 2 * n ** 3 / float(np.median(times)) / len(jax.local_devices())
  return _CPU_PEAK_CACHE['cpu']


def device_peak_flops(override: float = 0.0) -> float:
  """Per-device peak FLOP/s: the override, the table for known chips, else measured."""
  if override:
    return override
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return measured_cpu_peak()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch whenever it is installed, only to accept torch
  tensors; jaxlm passes floats, and that import costs ~2 s of startup and
  ~300 MB of memory. Unless the user's program already imported torch, it is
  hidden for the duration of this import (a None entry in sys.modules makes
  ``import torch`` raise ImportError, which tensorboardX handles).
  """
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter


def json_line(step: int, metrics: dict) -> str:
  """One strict-JSON metrics line: non-finite numbers (NaN, inf) become null."""
  clean = {k: v if isinstance(v, str) else (float(v) if math.isfinite(float(v)) else None)
           for k, v in metrics.items()}
  return json.dumps({'step': int(step), **clean}, allow_nan=False)


class MetricsWriter:
  """Writes metric dicts to tensorboard and metrics.jsonl (process 0 only).

  Both go through the workdir's path layer (jaxlm.core.storage; tensorboardX writes
  gs:// and s3:// event files itself), so a bucket workdir gets them too.
  Non-finite values are null in metrics.jsonl and left out of tensorboard, so
  both stay readable by strict parsers; a failed write raises StorageError.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      self._jsonl = storage.TextLog(storage.join(workdir, 'metrics.jsonl'))
      self._tb = _summary_writer_class()(storage.join(workdir, 'tensorboard'))

  def drop_after(self, step: int) -> None:
    """Forgets metrics.jsonl lines past ``step``: a resumed run rewrites them."""
    if not self.enabled:
      return
    self._jsonl.replace([l for l in self._jsonl.lines() if 0 <= _step_of(l) <= step])

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    line = json_line(step, metrics)
    for k, v in json.loads(line).items():
      if k != 'step' and isinstance(v, float):
        self._tb.add_scalar(k, v, step)
    try:
      self._jsonl.write(line + '\n')
    except Exception as e:  # noqa: BLE001  (gcsfs/s3fs raise more than OSError)
      raise StorageError(
          f'writing metrics for step {step} to {self._jsonl.path} failed: {_reason(e)}') from None

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, step)

  def close(self, quiet: bool = False) -> None:
    """Flushes and closes both sinks; ``quiet``: another error is already being reported."""
    if not self.enabled:
      return
    for sink in (self._tb, self._jsonl):
      try:
        sink.close()
      except Exception as e:  # noqa: BLE001  (gcsfs/s3fs raise more than OSError)
        if not quiet:
          raise StorageError(
              f'writing metrics to {self._jsonl.path.parent} failed: {_reason(e)}') from None


def _reason(e: Exception) -> str:
  if isinstance(e, OSError) and e.errno:
    return f'{errno.errorcode.get(e.errno, e.errno)} ({os.strerror(e.errno)})'
  return fault_reason(e)


def _step_of(line: str) -> int:
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return -1  # a line cut by a crash mid-write
