"""``jaxlm convert``: Hugging Face directory <-> jaxlm workdir, and loading either.

  jaxlm convert --from_hf=DIR --workdir=OUT [--data_path=corpus.txt]
      OUT/config.json (base config + the HF model's fields) and an Orbax
      checkpoint at step 0 (params + fresh optimizer state), so `jaxlm
      generate/eval` work on OUT and `jaxlm train --workdir=OUT` continues
      pretraining from it.
  jaxlm convert --to_hf=DIR --workdir=W [--restore_step=N] [--vocab_size=V]
      DIR/config.json + DIR/model.safetensors for GPT2LMHeadModel or
      LlamaForCausalLM (+ tokenizer.json when the run used an HF tokenizer).

The tensor-name mapping lives in jaxlm.hf; this module wires it to configs,
meshes and checkpoints. ``load(path)`` gives (config, Setup, params) for a
jaxlm workdir or an HF directory, for generation and fine-tuning.
"""

import dataclasses
import logging
import runpy
import shutil
from pathlib import Path

from jaxlm import config as config_lib
from jaxlm import hf
from jaxlm.errors import CheckpointError, ConfigError

log = logging.getLogger('jaxlm')
BASE_CONFIG = Path(__file__).resolve().parents[1] / 'configs' / 'base.py'


def define_flags(fv) -> None:
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_string('from_hf', None, 'import: Hugging Face model directory', flag_values=fv)
  flags.DEFINE_string('to_hf', None, 'export: directory to write the Hugging Face model to',
                      flag_values=fv)
  flags.DEFINE_string('workdir', None, 'jaxlm run directory (written by import, read by export)',
                      flag_values=fv)
  flags.DEFINE_integer('restore_step', None, 'export: checkpoint step (default: latest)',
                       flag_values=fv)
  flags.DEFINE_integer('vocab_size', 0, 'export: keep this many vocab rows (0 = model.vocab_size)',
                       flag_values=fv)
  flags.DEFINE_string('data_path', '', 'import: data.path for the new config (for eval/train)',
                      flag_values=fv)


def run(fv, args) -> int:
  if args:
    raise ConfigError(f"jaxlm convert takes no positional arguments (got {' '.join(args)})")
  if not fv.workdir:
    raise ConfigError('--workdir is required')
  if bool(fv.from_hf) == bool(fv.to_hf):
    raise ConfigError('give exactly one of --from_hf=DIR (import) or --to_hf=DIR (export)')
  if fv.from_hf:
    cfg = import_hf(fv.from_hf, fv.workdir, data_path=fv.data_path)
    print(f'imported {cfg.name} ({cfg.model.n_layers} layers, d_model {cfg.model.d_model}) '
          f'into {fv.workdir}')
  else:
    kind = export_hf(fv.workdir, fv.to_hf, restore_step=fv.restore_step, vocab_size=fv.vocab_size)
    print(f'exported {fv.workdir} as {kind} to {fv.to_hf}')
  return 0


def base_config():
  """configs/base.py's config (locked)."""
  return runpy.run_path(str(BASE_CONFIG))['get_config']()


def config_from_hf(hf_dir: str, hf_cfg: dict):
  """A full jaxlm config: base defaults with the model section from an HF config."""
  cfg = base_config()
  cfg.name = f"hf-{hf_cfg.get('model_type', 'model')}"
  for k, v in hf.model_fields(hf_cfg).items():
    cfg.model[k] = type(cfg.model[k])(v)
  cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
  tok = Path(hf_dir) / 'tokenizer.json'
  if tok.is_file():
    cfg.data.tokenizer, cfg.data.tokenizer_path = 'hf', str(tok.resolve())
  config_lib.validate(cfg, need_data=False)
  return cfg


def _device_params(setup, np_params):
  """numpy params -> arrays sharded like ``setup.abstract_state.params``, checked by name."""
  import jax  # noqa: PLC0415
  from jaxlm.checkpoint import _path  # noqa: PLC0415
  want = {_path(p): a for p, a in jax.tree_util.tree_flatten_with_path(
      setup.abstract_state.params)[0]}
  got = {_path(p): a for p, a in jax.tree_util.tree_flatten_with_path(np_params)[0]}
  if set(want) != set(got):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    raise CheckpointError(f'converted parameters do not match the model: missing {missing[:3]}, '
                          f'unexpected {extra[:3]}')
  for k, a in want.items():
    if tuple(got[k].shape) != tuple(a.shape):
      raise CheckpointError(f'converted parameter {k} has shape {tuple(got[k].shape)}, '
                            f'the model expects {tuple(a.shape)}')
  return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding),
                      np_params, setup.abstract_state.params)


def import_hf(hf_dir: str, workdir: str, data_path: str = ''):
  """HF dir -> workdir with config.json and a step-0 checkpoint. Returns the config."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jaxlm.checkpoint import Checkpointer  # noqa: PLC0415
  from jaxlm.train.loop import Setup  # noqa: PLC0415
  from jaxlm.train.step import TrainState  # noqa: PLC0415
  if (Path(workdir) / 'checkpoints').exists():
    raise ConfigError(f"workdir '{workdir}' already holds checkpoints (use a new --workdir)")
  hf_cfg, tensors = hf.read_dir(hf_dir)
  cfg = config_from_hf(hf_dir, hf_cfg)
  if data_path:
    cfg.data.path = data_path
  setup = Setup(cfg)
  params = _device_params(setup, hf.to_params(tensors, cfg.model))
  del tensors
  opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), setup.state_shardings.step)
  config_lib.save(cfg, workdir)
  ckpt = Checkpointer(workdir, cfg.checkpoint)
  ckpt.save(0, TrainState(step=step, params=params, opt_state=opt_state), None, force=True)
  ckpt.wait()
  ckpt.close()
  return cfg


@dataclasses.dataclass
class Loaded:
  """A model ready to run: its config, Setup (mesh, model, shardings) and sharded params."""
  cfg: object
  setup: object
  params: object
  step: int


def _is_jaxlm_workdir(path: Path) -> bool:
  return (path / 'checkpoints').is_dir() and (path / 'config.json').is_file()


def load(path: str, restore_step: int | None = None, mesh_overrides: dict | None = None) -> Loaded:
  """Params and model of a jaxlm workdir (params-only restore) or an HF directory.

  The saved mesh is kept when it fits this host's devices, else replaced by
  pure data parallelism (the checkpoint reshards). ``mesh_overrides`` (e.g.
  ``{'fsdp': 4, 'tensor': 2, 'data': 1}``) sets mesh fields explicitly.
  """
  from jaxlm import mesh as mesh_lib  # noqa: PLC0415
  from jaxlm.checkpoint import Checkpointer  # noqa: PLC0415
  from jaxlm.train.loop import Setup  # noqa: PLC0415
  p = Path(path)
  if _is_jaxlm_workdir(p):
    cfg = config_lib.load_saved(path)
    hf_tensors = None
  elif (p / 'config.json').is_file():
    hf_cfg, hf_tensors = hf.read_dir(path)
    cfg = config_from_hf(path, hf_cfg)
  else:
    raise ConfigError(f"'{path}' is neither a jaxlm workdir (config.json + checkpoints/) "
                      'nor a Hugging Face model directory')
  with cfg.unlocked():
    for k, v in (mesh_overrides or {}).items():
      cfg.mesh[k] = v
  mesh = mesh_lib.make_mesh(cfg.mesh) if mesh_overrides else mesh_lib.fit_to_host(cfg)
  setup = Setup(cfg, mesh)
  if hf_tensors is not None:
    return Loaded(cfg, setup, _device_params(setup, hf.to_params(hf_tensors, cfg.model)), 0)
  with Checkpointer(path, cfg.checkpoint, read_only=True) as ckpt:
    step = restore_step if restore_step is not None else ckpt.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint in '{ckpt.directory}' (train first)")
    params, _ = ckpt.restore(step, setup.abstract_state, params_only=True)
  return Loaded(cfg, setup, params, step)


def export_hf(workdir: str, out_dir: str, restore_step: int | None = None,
              vocab_size: int = 0) -> str:
  """Writes ``out_dir`` for transformers' from_pretrained; returns the architecture name."""
  import jax  # noqa: PLC0415
  from jaxlm.data.tokenizers import get_tokenizer  # noqa: PLC0415
  if not _is_jaxlm_workdir(Path(workdir)):
    raise ConfigError(f"workdir '{workdir}' has no config.json and checkpoints/ to export")
  cfg = config_lib.load_saved(workdir)
  m = cfg.model
  hf.export_family(m)  # refuse before restoring anything
  vocab = vocab_size or m.vocab_size
  if not 0 < vocab <= m.vocab_size:
    raise ConfigError(f'--vocab_size={vocab} must be in [1, model.vocab_size={m.vocab_size}]')
  loaded = load(workdir, restore_step)
  params = jax.device_get(loaded.params)
  try:
    tok = get_tokenizer(cfg.data)
    bos, eos = tok.bos_id, tok.eos_id
  except Exception:  # noqa: BLE001  (the tokenizer only supplies optional ids)
    tok, bos, eos = None, None, None
  bos = bos if bos is not None and bos < vocab else None
  eos = eos if eos is not None and eos < vocab else None
  hf.write_dir(out_dir, hf.hf_config(m, vocab, bos, eos), hf.from_params(params, m, vocab))
  if cfg.data.tokenizer == 'hf' and cfg.data.tokenizer_path:
    src = Path(cfg.data.tokenizer_path)
    src = src / 'tokenizer.json' if src.is_dir() else src
    if src.is_file():
      shutil.copy(src, Path(out_dir) / 'tokenizer.json')
  log.info('convert: wrote %s (step %d) to %s', hf.export_family(m), loaded.step, out_dir)
  return {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM'}[hf.export_family(m)]
