"""Warm start: a new run whose parameters come from another run or an HF model.

``train.init_from`` names a jaxlm workdir (its checkpoint ``train.init_from_step``,
-1 = latest) or a Hugging Face model directory. Only the parameters are taken:
the optimizer state, the lr schedule, the step and the data position start
fresh, as nanoGPT's ``init_from``, MaxText's ``load_parameters_path`` and
Levanter's ``initialize_from`` do. ``resolve`` checks the source against the
config (family and shapes, one ConfigError line) before the workdir is
written and records the resolved step in the config (so config.json says
where the parameters came from); ``params`` reads them onto the mesh.
"""

import logging

from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.core import config as config_lib
from jaxlm.core import storage
from jaxlm.core.errors import CheckpointError, ConfigError
from jaxlm.engine.build import config_from_hf, device_params
from jaxlm.hf import weights as hf

log = logging.getLogger('jaxlm')

# Fields that make a model another kind of model (the family) and fields that set
# parameter shapes; a source must agree on all of them.
FAMILY = ('norm', 'activation', 'position', 'use_bias', 'qkv_bias', 'qk_norm', 'tie_embeddings',
          'rope_scaling')
SHAPES = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
          'moe_experts', 'moe_shared_experts', 'moe_every', 'moe_mlp_dim', 'scan_layers')


def _is_workdir(p) -> bool:
  return (p / 'checkpoints').is_dir() and (p / 'config.json').is_file()


def source_model(source: str):
  """(the source's ``model`` config, 'workdir' or 'hf'); ConfigError if it is neither."""
  p = storage.path(source)
  if _is_workdir(p):
    return config_lib.load_saved(source).model, 'workdir'
  if (p / 'config.json').is_file():
    hf_cfg, _ = hf.read_dir(source)
    return config_from_hf(source, hf_cfg).model, 'hf'
  raise ConfigError(f"train.init_from '{source}' is neither a jaxlm workdir (config.json + "
                    'checkpoints/) nor a Hugging Face model directory')


def mismatches(src, m, kind: str) -> list[str]:
  """'model.<field> <source value> (source) vs <value> (config)' for each field that differs.

  An HF source's vocabulary may be padded with rows to the config's vocab_size.
  """
  out = []
  for key in FAMILY + SHAPES + (('max_seq_len',) if m.position == 'learned' else ()):
    a, b = src.get(key), m.get(key)
    if key == 'head_dim':
      a, b = a or src.d_model // src.n_heads, b or m.d_model // m.n_heads
    if key == 'vocab_size' and kind == 'hf':
      a = src.vocab_used or a
      if a <= b:
        continue
    if key == 'scan_layers' and kind == 'hf':
      continue  # an HF import is laid out for the config it is read into
    if a != b:
      out.append(f'model.{key} {a!r} (source) vs {b!r} (config)')
  return out


def resolve(cfg, workdir: str):
  """``cfg`` with ``train.init_from_step`` resolved, after checking the source.

  A workdir that already holds checkpoints resumes instead: its saved
  ``train.init_from*`` are kept, whatever this command says. ConfigError /
  CheckpointError on a source that does not fit, before anything is written.
  """
  t = cfg.train
  if storage.path(workdir).joinpath('checkpoints').is_dir():
    saved = config_lib.load_saved(workdir) if storage.path(workdir).joinpath(
        'config.json').exists() else None
    if saved is not None:
      cfg = cfg.copy_and_resolve_references()
      with cfg.unlocked():
        cfg.train.init_from, cfg.train.init_from_step = (saved.train.init_from,
                                                         saved.train.init_from_step)
    return cfg
  if not t.init_from:
    return cfg
  src, kind = source_model(t.init_from)
  bad = mismatches(src, cfg.model, kind)
  if bad:
    raise ConfigError(f"train.init_from '{t.init_from}' does not fit this model: "
                      + '; '.join(bad[:4]))
  step = 0
  if kind == 'workdir':
    saved = config_lib.load_saved(t.init_from)
    with Checkpointer(t.init_from, saved.checkpoint, read_only=True) as ckpt:
      steps = ckpt.steps()
      step = t.init_from_step if t.init_from_step >= 0 else ckpt.latest_step()
      if step is None:
        raise CheckpointError(f"train.init_from '{t.init_from}' has no checkpoint")
      if step not in steps:
        raise CheckpointError(f"train.init_from '{t.init_from}' has no checkpoint at step "
                              f"{step} (it has {', '.join(map(str, steps))})")
  cfg = cfg.copy_and_resolve_references()
  cfg.train.init_from_step = int(step)
  return cfg


def params(setup, cfg):
  """The parameters of ``cfg.train.init_from`` (resolved), sharded like ``setup``'s."""
  source, step = cfg.train.init_from, cfg.train.init_from_step
  if _is_workdir(storage.path(source)):
    with Checkpointer(source, config_lib.load_saved(source).checkpoint, read_only=True) as ckpt:
      log.info('init: parameters of step %d of %s (fresh optimizer, schedule and data)', step,
               source)
      p, _ = ckpt.restore(step, setup.abstract_state, params_only=True)
      return p
  _, tensors = hf.read_dir(source)
  log.info('init: parameters of the Hugging Face model %s (fresh optimizer, schedule and data)',
           source)
  return device_params(setup, hf.to_params(tensors, cfg.model))
