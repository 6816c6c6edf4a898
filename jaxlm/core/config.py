"""Loading, checking and saving run configs.

Validation happens here, once, before anything is compiled, so that bad input
fails in a second with a message naming the key.
"""

import json

import ml_collections

from jaxlm.core import storage
from jaxlm.core.errors import ConfigError

# jax's library attention kernels (jaxlm/model/kernels.py) and where each compiles natively;
# only splash can split the sequence, and those in NO_WINDOW have no sliding window.
LIBRARY_KERNELS = {'splash': 'tpu', 'pallas_gpu': 'gpu', 'cudnn': 'gpu'}
NO_WINDOW = ('pallas_gpu',)

CHOICES = {
    'model.norm': ('layernorm', 'rmsnorm'),
    'model.activation': ('gelu', 'gelu_exact', 'swiglu'),
    'model.position': ('learned', 'rope'),
    'model.rope_scaling': ('', 'llama3'),
    'model.attention': ('xla', 'chunked', *LIBRARY_KERNELS),
    'model.remat': ('none', 'full', 'dots', 'minimal'),
    'model.param_dtype': ('float32', 'bfloat16', 'float16'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'data.source': ('text', 'jsonl', 'arrayrecord', 'pystdlib', 'pairs'),
    'data.tokenizer': ('byte', 'char', 'sentencepiece', 'hf'),
    'optim.schedule': ('cosine', 'linear', 'constant', 'wsd'),
    'optim.mu_dtype': ('', 'float32', 'bfloat16'),
}

# Keys that may change when resuming a run in an existing workdir: they alter
# how the run is observed or laid out, not what it computes. (train.steps and
# optim.decay_steps move the lr schedule's horizon: optimizer.resume_horizon checks them.)
RESUMABLE_KEYS = ('name', 'train.steps', 'train.log_every', 'train.peak_flops', 'train.profile_steps',
                  'train.progress', 'train.max_bad_steps', 'eval.', 'checkpoint.', 'mesh.',
                  'data.worker_count', 'data.prefetch', 'data.path', 'data.tokenizer_path',
                  'data.eval_path',
                  'optim.decay_steps',
                  'model.loss_chunk', 'model.loss_vocab_chunk',  # the same loss, summed in another order
                  'model.pipeline_')  # the same model, scheduled over stages differently


def _get(cfg, dotted: str):
  for part in dotted.split('.'):
    cfg = cfg[part]
  return cfg


def flatten(cfg, prefix: str = '') -> dict:
  """{'model.d_model': 128, ...} for a (nested) ConfigDict or dict."""
  out = {}
  for k, v in (cfg.items() if hasattr(cfg, 'items') else []):
    key = f'{prefix}{k}'
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def validate(cfg, need_data: bool = True) -> None:
  """Raises ConfigError naming the first inconsistent key (data paths only if need_data)."""
  for key, allowed in CHOICES.items():
    if _get(cfg, key) not in allowed:
      raise ConfigError(f"{key}='{_get(cfg, key)}' is not one of {', '.join(map(repr, allowed))}")
  m, d, t = cfg.model, cfg.data, cfg.train
  positive = ('model.vocab_size', 'model.d_model', 'model.n_layers', 'model.n_heads',
              'model.n_kv_heads', 'model.mlp_dim', 'model.max_seq_len', 'data.seq_len',
              'train.steps', 'train.batch_size', 'train.grad_accum', 'train.log_every',
              'eval.batches', 'checkpoint.keep', 'model.attention_chunk', 'train.max_bad_steps')
  for key in positive:
    if _get(cfg, key) <= 0:
      raise ConfigError(f'{key}={_get(cfg, key)} must be positive')
  if m.pipeline_repeats < 1:
    raise ConfigError(f'model.pipeline_repeats={m.pipeline_repeats} must be positive')
  for key in ('model.pipeline_microbatches', 'model.sliding_window', 'checkpoint.keep_period',
              'checkpoint.keep_best',
              'checkpoint.every', 'data.prefetch', 'data.worker_count', 'optim.decay_steps'):
    if _get(cfg, key) < 0:
      raise ConfigError(f'{key}={_get(cfg, key)} must be >= 0')
  if cfg.checkpoint.keep_best and not cfg.eval.every:
    raise ConfigError(f'checkpoint.keep_best={cfg.checkpoint.keep_best} ranks checkpoints by '
                      'eval loss, so it needs eval.every > 0')
  if not 0 <= m.vocab_used <= m.vocab_size:
    raise ConfigError(f'model.vocab_used={m.vocab_used} must be in [0, model.vocab_size='
                      f'{m.vocab_size}]')
  if m.n_heads % m.n_kv_heads:
    raise ConfigError(f'model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads}')
  if not m.head_dim and m.d_model % m.n_heads:
    raise ConfigError(f'model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}')
  if m.sliding_window and m.attention in NO_WINDOW:
    raise ConfigError(f"model.sliding_window={m.sliding_window} is not supported by "
                      f"model.attention='{m.attention}'; kernels with one: "
                      + ', '.join(k for k in CHOICES['model.attention'] if k not in NO_WINDOW))
  if m.attention == 'cudnn' and m.dtype == 'float32':
    raise ConfigError("model.attention='cudnn' needs model.dtype='bfloat16' or 'float16' "
                      "(cuDNN flash attention has no float32)")
  if m.attention in LIBRARY_KERNELS and cfg.mesh.sequence != 1:
    if m.attention != 'splash':
      raise ConfigError(f"model.attention='{m.attention}' cannot split the sequence "
                        f"(mesh.sequence={cfg.mesh.sequence}); use 'chunked' or 'splash'")
    if cfg.mesh.sequence < 1 or d.seq_len % (128 * cfg.mesh.sequence):
      raise ConfigError(f"model.attention='splash' with mesh.sequence={cfg.mesh.sequence} needs "
                        f"data.seq_len={d.seq_len} to split into whole 128-slot blocks")
  if m.position == 'rope' and (m.head_dim or m.d_model // m.n_heads) % 2:
    raise ConfigError('model.head_dim must be even for RoPE')
  _validate_moe(m)
  if d.seq_len > m.max_seq_len:
    raise ConfigError(f'data.seq_len={d.seq_len} is above model.max_seq_len={m.max_seq_len}')
  if t.batch_size % t.grad_accum:
    raise ConfigError(f'train.batch_size={t.batch_size} is not divisible by '
                      f'train.grad_accum={t.grad_accum}')
  if not 0.0 < cfg.optim.decay_fraction <= 1.0:
    raise ConfigError(f'optim.decay_fraction={cfg.optim.decay_fraction} must be in (0, 1]')
  if t.spike_factor and t.spike_factor <= 1.0:
    raise ConfigError(f'train.spike_factor={t.spike_factor} must be 0 (off) or above 1')
  if not 0.0 <= d.val_fraction < 1.0:
    raise ConfigError(f'data.val_fraction={d.val_fraction} must be in [0, 1)')
  if need_data and d.source != 'pystdlib' and not d.path and not d.mixture:
    raise ConfigError(f"data.path is empty but data.source='{d.source}' needs one (or data.mixture)")
  if need_data and d.tokenizer not in ('byte', 'char') and not d.tokenizer_path:
    raise ConfigError(f"data.tokenizer_path is empty but data.tokenizer='{d.tokenizer}' needs one")
  if t.profile_steps:
    parts = t.profile_steps.split(',')
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
      raise ConfigError(f"train.profile_steps='{t.profile_steps}' must be 'start,stop'")


def eval_batch_size(cfg) -> int:
  """Sequences per eval batch: ``eval.batch_size``, by default the train micro-batch
  (``train.batch_size // train.grad_accum``), which is known to fit."""
  return int(cfg.eval.batch_size) or int(cfg.train.batch_size) // int(cfg.train.grad_accum)


def _validate_moe(m) -> None:
  for key in ('moe_experts', 'moe_shared_experts', 'moe_mlp_dim', 'moe_capacity_factor',
              'moe_aux_loss_weight', 'moe_z_loss_weight'):
    if m[key] < 0:
      raise ConfigError(f'model.{key}={m[key]} must be >= 0')
  if not m.moe_experts:
    return
  if not 1 <= m.moe_top_k <= m.moe_experts:
    raise ConfigError(f'model.moe_top_k={m.moe_top_k} must be in [1, model.moe_experts='
                      f'{m.moe_experts}]')
  if m.activation != 'swiglu':
    raise ConfigError(f"model.moe_experts={m.moe_experts} needs model.activation='swiglu' "
                      f"(experts are SwiGLU), got '{m.activation}'")
  if m.moe_every < 1 or m.moe_every > m.n_layers:
    raise ConfigError(f'model.moe_every={m.moe_every} must be in [1, model.n_layers={m.n_layers}]')
  if m.scan_layers and m.n_layers % m.moe_every:
    raise ConfigError(f'model.n_layers={m.n_layers} is not a multiple of model.moe_every='
                      f'{m.moe_every} (scanned layers repeat one group; or set scan_layers=False)')


def to_json(cfg) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def save(cfg, workdir: str) -> None:
  storage.write_atomic(storage.join(workdir, 'config.json'), to_json(cfg))


def _read_saved(workdir: str) -> dict | None:
  """config.json of ``workdir`` as a dict; None if there is none."""
  path = storage.path(workdir) / 'config.json'
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def load_saved(workdir: str):
  """The config a run was started with, as a locked ConfigDict."""
  saved = _read_saved(workdir)
  if saved is None:
    raise ConfigError(f"workdir '{workdir}' has no config.json (was it trained with jaxlm?)")
  cfg = ml_collections.ConfigDict(with_defaults(saved))
  cfg.lock()
  return cfg


def with_defaults(saved: dict) -> dict:
  """``saved`` with every field it lacks taken from base (a run written before the field
  existed keeps loading and resuming, and computes as it did)."""
  from jaxlm.configs import base  # noqa: PLC0415

  def merge(default, value):
    if isinstance(default, dict) and isinstance(value, dict):
      return {**default, **{k: merge(default.get(k), v) for k, v in value.items()}}
    return value

  return merge(base.get_config().to_dict(), saved)


def conflicts(cfg, workdir: str) -> list[str]:
  """Keys whose value differs from the run already in ``workdir``."""
  saved = _read_saved(workdir)
  if saved is None:
    return []
  old = flatten(with_defaults(saved))
  new = flatten(cfg.to_dict())
  out = []
  for key in sorted(set(old) | set(new)):
    if any(key == k or (k.endswith('.') and key.startswith(k)) for k in RESUMABLE_KEYS):
      continue
    if old.get(key) != new.get(key):
      out.append(f'{key} ({old.get(key)!r} -> {new.get(key)!r})')
  return out
