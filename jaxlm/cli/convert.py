"""``jaxlm convert``: Hugging Face directory <-> jaxlm workdir, and loading either.

  jaxlm convert --from_hf=DIR --workdir=OUT [--data_path=corpus.txt]
      [--param_dtype=bfloat16]
      OUT/config.json (base config + the HF model's fields, vocab padded to a
      multiple of 128) and an Orbax checkpoint at step 0 holding the params
      only, written one tensor at a time; `jaxlm generate/eval` work on OUT and
      `jaxlm train --workdir=OUT` continues pretraining from it (creating the
      optimizer state).
  jaxlm convert --to_hf=DIR --workdir=W [--restore_step=N] [--vocab_size=V]
      [--max_shard_size=1GB]
      DIR/config.json + DIR/model.safetensors (or model-0000i-of-0000N.safetensors
      + model.safetensors.index.json past max_shard_size) for the model's HF
      architecture, written tensor by tensor, and the tokenizer and generation files
      (jaxlm.hf.tokenizer); on several hosts only process 0 writes.

The tensor-name mapping lives in jaxlm.hf.weights; this module wires it to configs,
meshes and checkpoints. Loading either kind of directory for inference is
``jaxlm.engine.build.load``.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
from absl import flags

from jaxlm.checkpoint import param_store
from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.core import config as config_lib
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import storage
from jaxlm.core.tree import misfits, shapes as tree_shapes
from jaxlm.data import workdir_tokenizer
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.hf import weights as hf, tokenizer as hf_tokenizer, writer as hf_writer
from jaxlm.run import lock, preflight, runtime
# load: convert.load opens either kind of directory (tests and users call it here).
from jaxlm.core.errors import CheckpointError, ConfigError
from jaxlm.engine.build import Setup, check_placeable, config_from_hf, is_workdir, load  # noqa: F401

log = logging.getLogger('jaxlm')
DEFAULT_MAX_SHARD_SIZE = '1GB'


def define_flags(fv) -> None:
  flags.DEFINE_string('from_hf', None, 'import: Hugging Face model directory', flag_values=fv)
  flags.DEFINE_string('to_hf', None, 'export: directory to write the Hugging Face model to',
                      flag_values=fv)
  flags.DEFINE_string('workdir', None, 'jaxlm run directory (written by import, read by export)',
                      flag_values=fv)
  flags.DEFINE_integer('restore_step', None, 'export: checkpoint step (default: latest)',
                       flag_values=fv)
  flags.DEFINE_string('max_shard_size', DEFAULT_MAX_SHARD_SIZE, 'export: largest safetensors '
                      'file (e.g. 500MB, 2GB); more tensors go to further files + an index '
                      '(host memory holds about one file)', flag_values=fv)
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
    kind = export_hf(fv.workdir, fv.to_hf, restore_step=fv.restore_step, vocab_size=fv.vocab_size,
                     max_shard_size=fv.max_shard_size)
    if runtime.is_main():
      print(f'exported {fv.workdir} as {kind} to {fv.to_hf}')
  return 0


def import_hf(hf_dir: str, workdir: str, data_path: str = '', param_dtype: str = ''):
  """HF dir -> workdir with config.json and a params-only checkpoint at step 0.

  Host memory stays near one block of one tensor: Orbax first writes the
  checkpoint with every parameter empty (jaxlm.checkpoint.param_store.save_empty), then
  each parameter is read from the memory-mapped safetensors, cast to
  ``model.param_dtype`` and written into its array a block of rows at a time;
  then every parameter is read back from storage and compared with its source.
  The step is built under ``<workdir>/checkpoints.importing`` and renamed to
  ``checkpoints/0`` when complete, so an interrupted import leaves no step.
  No optimizer state is written: training from the workdir creates it.
  Returns the config.
  """
  import tensorstore as ts  # noqa: PLC0415
  if (storage.path(workdir) / 'checkpoints').exists():
    raise ConfigError(f"workdir '{workdir}' already holds checkpoints (use a new --workdir)")
  hf_cfg, tensors = hf.read_dir(hf_dir)
  cfg = config_from_hf(hf_dir, hf_cfg)
  if data_path:
    cfg.data.path = data_path
  cfg = preflight.absolute_paths(cfg)
  if param_dtype:
    cfg.model.param_dtype = param_dtype
  config_lib.validate(cfg, need_data=False)
  setup = Setup(cfg)
  check_placeable(setup)
  leaves = _checked_leaves(tensors, cfg.model, tree_shapes(setup.abstract_state.params))
  tokenizer_copy = workdir_tokenizer.plan(cfg, workdir, get_tokenizer(cfg.data)) \
      if cfg.data.tokenizer != 'byte' else None
  # Absolute: Orbax refuses a relative destination.
  building = storage.join(storage.absolute(workdir), 'checkpoints.importing')
  if storage.path(building).exists():  # what an interrupted import left
    storage.path(building).rmtree()
  try:
    param_store.save_empty(building, {path: leaf.shape for path, leaf in leaves},
                           jnp.dtype(cfg.model.param_dtype))
    context, layout = ts.Context(), param_store.read_layout(building)
    for path, leaf in leaves:
      # release(): the file pages just copied stop counting toward this process's memory.
      param_store.fill(param_store.open_param(building, path, context, layout, write=True),
                       leaf, after_block=tensors.release)
    _verify_written(building, leaves, tensors.release)
  except BaseException:
    if storage.path(building).exists():  # a failed import leaves no half-written step
      storage.path(building).rmtree()
    raise
  # config.json last: a workdir with a config always holds the step it describes.
  cfg = workdir_tokenizer.install(cfg, workdir, tokenizer_copy)
  config_lib.save(cfg, workdir)
  (storage.path(workdir) / 'checkpoints').mkdir(parents=True, exist_ok=True)
  storage.path(building).rename(storage.path(storage.join(workdir, 'checkpoints', '0')))
  return cfg


def _verify_written(step_dir: str, leaves, release) -> None:
  """Reads every parameter back as Orbax's restore will (a fresh cache, missing chunks an
  error) and compares it with its source; CheckpointError naming the first that differs.
  The step is still under checkpoints.importing, so a failed import leaves no step."""
  import tensorstore as ts  # noqa: PLC0415
  context, layout = ts.Context(), param_store.read_layout(step_dir)
  for path, leaf in leaves:
    problem = param_store.verify(
        param_store.open_param(step_dir, path, context, layout, strict=True), leaf, release)
    if problem:
      raise CheckpointError(f"import wrote parameter {'/'.join(path)} {leaf.shape} but its "
                            f'{problem}; nothing was imported (check the disk and retry)')


def _checked_leaves(tensors, m, want: dict) -> list:
  """[(path, hf.Leaf)] for every parameter, checked against the model's names and
  shapes before anything is written."""
  leaves = list(hf.param_leaves(tensors, m))
  got = {'/'.join(path): leaf.shape for path, leaf in leaves}
  bad = misfits(want, got)
  if bad:
    name, shape, expected = bad[0]
    raise CheckpointError(f'converted parameter {name} has shape {shape}, the model expects '
                          f'{"no such parameter" if expected is None else expected}')
  missing = set(want) - set(got)
  if missing:
    raise CheckpointError(f'converted parameters do not match the model: missing '
                          f'{sorted(missing)[:3]}')
  return leaves


def export_hf(workdir: str, out_dir: str, restore_step: int | None = None,
              vocab_size: int = 0, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> str:
  """Writes ``out_dir`` for transformers' from_pretrained; returns the architecture name.

  Tensor by tensor: each parameter (one layer of a stacked one at a time) is read
  from the checkpoint's arrays (jaxlm.checkpoint.param_store), mapped to its HF tensors and
  added to safetensors files of at most ``max_shard_size`` (+ an index when
  there are several), so host memory stays near one file plus one tensor.
  Multi-host: process 0 reads and writes everything (reading storage needs no
  gathers); the others wait for it, so all return when the files are complete.
  """
  from jax.experimental import multihost_utils  # noqa: PLC0415
  if not is_workdir(workdir):
    raise ConfigError(f"workdir '{workdir}' has no config.json and checkpoints/ to export")
  runtime.initialize()
  limit = hf_writer.parse_size(max_shard_size)
  cfg = config_lib.load_saved(workdir)
  m = cfg.model
  kind = hf.hf_config(m, m.vocab_size)['architectures'][0]  # refuse before reading anything
  vocab = vocab_size or m.vocab_used or m.vocab_size  # the HF vocabulary, padding cut
  if not 0 < vocab <= m.vocab_size:
    raise ConfigError(f'--vocab_size={vocab} must be in [1, model.vocab_size={m.vocab_size}]')
  with Checkpointer(workdir, cfg.checkpoint, read_only=True) as ckpt:
    step = ckpt.require_step(restore_step)
    step_dir = ckpt.step_dir(step)
  if jax.process_index() == 0:
    params = Setup(cfg, mesh_lib.fit_to_host(cfg)).abstract_state.params
    shapes = {tuple(k.split('/')): s for k, s in tree_shapes(params).items()}
    with hf_writer.ShardedWriter(out_dir, limit) as out:
      for name, tensor in _hf_tensors(step_dir, m, vocab, shapes):
        out.add(name, tensor)
    _world_readable(out_dir, out.files + _write_config(cfg, out_dir, vocab))
    log.info('convert: wrote %s (step %d) to %s: %d file(s), %.2f GB', kind, step, out_dir,
             len(out.files), out.total / 1e9)
  multihost_utils.sync_global_devices('jaxlm convert --to_hf')  # the files are complete
  return kind


def _hf_tensors(step_dir: str, m, vocab: int, shapes: dict):
  """Yields (HF name, float32 tensor) read from a step's arrays, one layer at a time."""
  import tensorstore as ts  # noqa: PLC0415
  context, layout = ts.Context(), param_store.read_layout(step_dir)

  def array(path):
    try:
      a = param_store.open_param(step_dir, path, context, layout)
    except ValueError as e:  # tensorstore: NOT_FOUND and friends
      raise CheckpointError(f"checkpoint {step_dir} has no readable parameter "
                            f"params/{'/'.join(path)} ({str(e).splitlines()[0][:200]})") from None
    if tuple(a.shape) != shapes[path]:
      raise CheckpointError(f"checkpoint {step_dir}: parameter params/{'/'.join(path)} has "
                            f'shape {tuple(a.shape)} but the config gives {shapes[path]}')
    return a

  # Embedding and head first, while the writer holds nothing: at the end they would
  # meet a nearly full file.
  yield from hf.top_to_hf(lambda p: array(p).read().result() if p in shapes else None, m, vocab)
  runtime.trim_host_memory()
  stacked = [p for p in shapes if p[0] == 'layers']
  for i in range(m.n_layers):
    layer = {}
    for path in stacked or [p for p in shapes if p[0] == f'layer_{i}']:
      node = layer
      for k in path[1:-1]:
        node = node.setdefault(k, {})
      a = array(path)
      node[path[-1]] = (a[i] if stacked else a).read().result()
    yield from hf.layer_to_hf(layer, i, m).items()
    del layer
    runtime.trim_host_memory()


def _write_config(cfg, out_dir: str, vocab: int) -> list[str]:
  """config.json and the tokenizer and generation files (jaxlm.hf.tokenizer); their names."""
  tok = get_tokenizer(cfg.data)
  names, ids = hf_tokenizer.write(out_dir, cfg, tok, vocab)
  config = hf.hf_config(cfg.model, vocab, ids.get('bos_token_id'), ids.get('eos_token_id'))
  config['pad_token_id'] = ids.get('pad_token_id')
  storage.path(storage.join(out_dir, 'config.json')).write_text(
      json.dumps(config, indent=2, sort_keys=True))
  return ['config.json', *names]


def _world_readable(out_dir: str, names: list[str]) -> None:
  """rw-r--r-- on the exported files: safetensors writes 0600, which other users of a
  shared model folder (or a serving container) cannot read."""
  if storage.is_remote(out_dir):
    return
  for name in [*names, 'model.safetensors.index.json']:
    p = os.path.join(out_dir, name)
    if os.path.exists(p):
      os.chmod(p, 0o644)
