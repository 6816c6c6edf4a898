"""``jaxlm convert``: Hugging Face directory <-> jaxlm workdir, and loading either.

  jaxlm convert --from_hf=DIR --workdir=OUT [--data_path=corpus.txt]
      [--param_dtype=bfloat16]
      OUT/config.json (base config + the HF model's fields, vocab padded to a
      multiple of 128) and an Orbax checkpoint at step 0 holding the params
      only, written one tensor at a time; `jaxlm generate/eval` work on OUT and
      `jaxlm train --workdir=OUT` continues pretraining from it (creating the
      optimizer state).
  jaxlm convert --to_hf=DIR --workdir=W [--restore_step=N] [--vocab_size=V]
      DIR/config.json + DIR/model.safetensors for GPT2LMHeadModel or
      LlamaForCausalLM (+ tokenizer.json when the run used an HF tokenizer).

The tensor-name mapping lives in jaxlm.hf; this module wires it to configs,
meshes and checkpoints. Loading either kind of directory for inference is
``jaxlm.engine.load``.
"""

import logging

import jax
import jax.numpy as jnp
from absl import flags

from jaxlm import config as config_lib
from jaxlm import hf, lock, storage
from jaxlm.checkpoint import Checkpointer, leaf_name
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.engine import Setup, check_placeable, config_from_hf, is_workdir, load
from jaxlm.errors import CheckpointError, ConfigError

log = logging.getLogger('jaxlm')
IMPORT_CHUNK_BYTES = 64 << 20


def define_flags(fv) -> None:
  flags.DEFINE_string('from_hf', None, 'import: Hugging Face model directory', flag_values=fv)
  flags.DEFINE_string('to_hf', None, 'export: directory to write the Hugging Face model to',
                      flag_values=fv)
  flags.DEFINE_string('workdir', None, 'jaxlm run directory (written by import, read by export)',
                      flag_values=fv)
  flags.DEFINE_integer('restore_step', None, 'export: checkpoint step (default: latest)',
                       flag_values=fv)
  flags.DEFINE_integer('vocab_size', 0, 'export: keep this many vocab rows '
                       '(0 = model.vocab_used, else model.vocab_size)', flag_values=fv)
  flags.DEFINE_string('data_path', '', 'import: data.path for the new config (for eval/train)',
                      flag_values=fv)
  flags.DEFINE_enum('param_dtype', '', ['', 'float32', 'bfloat16', 'float16'],
                    'import: model.param_dtype (default float32); bfloat16 keeps bf16 weights '
                    'bf16', flag_values=fv)
  lock.define_flags(fv)  # import writes the workdir and takes its lock


def run(fv, args) -> int:
  if args:
    raise ConfigError(f"jaxlm convert takes no positional arguments (got {' '.join(args)})")
  if not fv.workdir:
    raise ConfigError('--workdir is required')
  if bool(fv.from_hf) == bool(fv.to_hf):
    raise ConfigError('give exactly one of --from_hf=DIR (import) or --to_hf=DIR (export)')
  if fv.from_hf:
    with lock.WorkdirLock(fv.workdir, stale_after=fv.lock_timeout, force=fv.force_unlock):
      cfg = import_hf(fv.from_hf, fv.workdir, data_path=fv.data_path,
                      param_dtype=fv.param_dtype)
    print(f'imported {cfg.name} ({cfg.model.n_layers} layers, d_model {cfg.model.d_model}) '
          f'into {fv.workdir}')
  else:
    kind = export_hf(fv.workdir, fv.to_hf, restore_step=fv.restore_step, vocab_size=fv.vocab_size)
    print(f'exported {fv.workdir} as {kind} to {fv.to_hf}')
  return 0


def import_hf(hf_dir: str, workdir: str, data_path: str = '', param_dtype: str = ''):
  """HF dir -> workdir with config.json and a params-only checkpoint at step 0.

  Host memory stays near one parameter: each is read from the memory-mapped
  safetensors, cast to ``model.param_dtype``, placed into its shards
  (``make_array_from_callback``) and added to the checkpoint (Orbax partial
  save) before the next is read. No optimizer state is written: training from
  the workdir creates it. Returns the config.
  """
  from orbax.checkpoint import v1 as ocp  # noqa: PLC0415
  from orbax.checkpoint.experimental.v1 import partial  # noqa: PLC0415
  if (storage.path(workdir) / 'checkpoints').exists():
    raise ConfigError(f"workdir '{workdir}' already holds checkpoints (use a new --workdir)")
  hf_cfg, tensors = hf.read_dir(hf_dir)
  cfg = config_from_hf(hf_dir, hf_cfg)
  if data_path:
    cfg.data.path = data_path
  if param_dtype:
    cfg.model.param_dtype = param_dtype
  config_lib.validate(cfg, need_data=False)
  setup = Setup(cfg)
  check_placeable(setup)
  want = {leaf_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(
      setup.abstract_state.params)[0]}
  config_lib.save(cfg, workdir)
  step_dir = storage.join(storage.absolute(workdir), 'checkpoints', '0')
  # 64 MiB storage chunks: Orbax then writes a parameter a chunk at a time instead of
  # holding one more whole copy of it (bench/RESULTS.md: peak RSS 3.69 -> 2.3 GiB at 1B).
  opts = ocp.options.ArrayOptions
  with ocp.Context(array_options=opts(saving=opts.Saving(
      storage_options=opts.Saving.StorageOptions(chunk_byte_size=IMPORT_CHUNK_BYTES)))):
    done = _write_params(tensors, cfg.model, want, step_dir, partial)
    if done != set(want):
      raise CheckpointError(f'converted parameters do not match the model: missing '
                            f'{sorted(set(want) - done)[:3]}')
    partial.save(step_dir, {'step': jax.device_put(jnp.zeros((), jnp.int32),
                                                   setup.state_shardings.step)})
  partial.finalize(step_dir)
  return cfg


def _write_params(tensors, m, want: dict, step_dir: str, partial) -> set[str]:
  """Places each converted parameter into its shards and appends it to the step-0
  checkpoint, one at a time. Returns the names written."""
  done = set()
  for path, leaf in hf.param_leaves(tensors, m):
    name = '/'.join(path)
    a = want.get(name)
    if a is None or leaf.shape != tuple(a.shape):
      raise CheckpointError(f'converted parameter {name} has shape {leaf.shape}, the model '
                            f'expects {"no such parameter" if a is None else tuple(a.shape)}')

    def shard(idx, leaf=leaf):  # each device's slice, built from the tensors' views
      out = leaf[idx]
      tensors.release()  # unmap: the file pages just copied stop counting toward memory
      return out

    node = jax.make_array_from_callback(a.shape, a.sharding, shard)
    for k in reversed(('params',) + path):
      node = {k: node}
    partial.save(step_dir, node)
    done.add(name)
    del node
  return done


def export_hf(workdir: str, out_dir: str, restore_step: int | None = None,
              vocab_size: int = 0) -> str:
  """Writes ``out_dir`` for transformers' from_pretrained; returns the architecture name."""
  if not is_workdir(workdir):
    raise ConfigError(f"workdir '{workdir}' has no config.json and checkpoints/ to export")
  cfg = config_lib.load_saved(workdir)
  m = cfg.model
  hf.export_family(m)  # refuse before restoring anything
  vocab = vocab_size or m.vocab_used or m.vocab_size  # the HF vocabulary, padding cut
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
    src = storage.path(cfg.data.tokenizer_path)
    src = src / 'tokenizer.json' if src.is_dir() else src
    if src.is_file():
      storage.copy(src, storage.join(out_dir, 'tokenizer.json'))
  log.info('convert: wrote %s (step %d) to %s', hf.export_family(m), loaded.step, out_dir)
  return hf.hf_config(m, vocab)['architectures'][0]
