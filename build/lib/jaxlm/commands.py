"""What each CLI command does, given parsed flags (see jaxlm.cli)."""

import json
import logging
import math

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import mesh as mesh_lib
from jaxlm import runtime, storage
from jaxlm.checkpoint import Checkpointer
from jaxlm.data.pipeline import make_pipeline
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.engine import Setup
from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.lock import WorkdirLock
from jaxlm.train.loop import Trainer

log = logging.getLogger('jaxlm')


def _workdir(fv) -> str:
  if not fv.workdir:
    raise ConfigError('--workdir is required')
  return fv.workdir


def train(fv) -> int:
  runtime.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
  workdir = _workdir(fv)
  trainer = Trainer(fv.config, workdir, restore_step=fv.restore_step)
  with WorkdirLock(workdir, stale_after=fv.lock_timeout, force=fv.force_unlock) as lock:
    trainer.add_hook(lock.hook())
    summary = trainer.run()
  if runtime.is_main() and 'train/loss' in summary:
    extra = f", eval/loss {summary['eval/loss']:.4f}" if 'eval/loss' in summary else ''
    print(f"step {summary['step']}: train/loss {summary['train/loss']:.4f}{extra}")
  return 0


def _saved_run(fv):
  """(config, Setup, restored state) for a trained workdir, on this machine's devices."""
  workdir = _workdir(fv)
  runtime.initialize()
  cfg = fv.config if fv.config is not None else config_lib.load_saved(workdir)
  setup = Setup(cfg, mesh_lib.fit_to_host(cfg))
  with Checkpointer(workdir, cfg.checkpoint, read_only=True) as ckpt:
    step = fv.restore_step if fv.restore_step is not None else ckpt.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint in '{ckpt.directory}' (train first)")
    state, _ = ckpt.restore(step, setup.abstract_state)
  return cfg, setup, state, step


def eval(fv) -> int:  # noqa: A001  (the command's name)
  if fv.tasks:
    return lm_eval_tasks(fv)
  cfg, setup, state, step = _saved_run(fv)
  data = make_pipeline(cfg, jax.process_index(), jax.process_count())
  loss = setup.eval_loss(state.params, data.eval_batches())
  if runtime.is_main():
    storage.append_text(storage.join(fv.workdir, 'metrics.jsonl'),
                        json.dumps({'step': step, 'eval/loss': loss}) + '\n')
    print(f'step {step}: eval/loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.3f}')
  return 0


def lm_eval_tasks(fv) -> int:
  """lm-evaluation-harness tasks on a saved run: <workdir>/lm_eval/step_N.json + tensorboard."""
  from jaxlm.engine import load  # noqa: PLC0415
  from jaxlm.evals import load_lm_eval  # noqa: PLC0415
  from jaxlm.train.metrics import MetricsWriter  # noqa: PLC0415
  adapter = load_lm_eval()
  workdir = _workdir(fv)
  runtime.initialize()
  manager, tasks = adapter.task_manager(fv.tasks, fv.include_path)  # names checked before loading
  loaded = load(workdir, fv.restore_step)
  lm = adapter.JaxlmLM.from_parts(loaded.setup.model, loaded.params, get_tokenizer(loaded.cfg.data),
                                  loaded.setup.mesh, loaded.setup.rules, fv.batch_size)
  results = adapter.simple_evaluate(lm, tasks, fv.limit, fv.num_fewshot, manager=manager)
  path = adapter.write_results(workdir, loaded.step, results)
  writer = MetricsWriter(workdir, enabled=runtime.is_main())
  writer.write(loaded.step, adapter.flat_metrics(results))
  writer.close()
  if runtime.is_main():
    from lm_eval.utils import make_table  # noqa: PLC0415
    print(make_table(results))
    print(f'step {loaded.step}: results in {path}')
  return 0


def generate(fv) -> int:
  cfg, setup, state, _ = _saved_run(fv)
  tokenizer = get_tokenizer(cfg.data)
  text = setup.generate_text(state.params, tokenizer, [fv.prompt],
                             max_new_tokens=fv.max_new_tokens, temperature=fv.temperature,
                             top_k=fv.top_k, top_p=fv.top_p, seed=fv.seed)[0]
  if runtime.is_main():
    print(fv.prompt + text)
  return 0


def _gib(n: float) -> str:
  return f'{n / 2**30:.2f} GiB'


def plan(fv) -> int:
  """Parameter count and per-device memory for the configured mesh, without training."""
  cfg = fv.config
  config_lib.validate(cfg, need_data=False)
  sizes = {k: int(cfg.mesh[k]) for k in mesh_lib.MESH_AXES}
  dcn = int(cfg.mesh.dcn_data) * int(cfg.mesh.dcn_fsdp)
  if -1 in sizes.values():
    mesh = mesh_lib.make_mesh(cfg.mesh)
  else:
    sizes['data'] *= max(dcn, 1)
    mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), mesh_lib.MESH_AXES)
  n_dev = math.prod(mesh.shape.values())
  setup = Setup(cfg, mesh)
  st = setup.abstract_state

  def per_device(tree) -> float:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))

  def total(tree) -> float:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

  m = cfg.model
  local_batch = cfg.train.batch_size // cfg.train.grad_accum // mesh_lib.data_parallel_size(mesh)
  tokens = local_batch * cfg.data.seq_len // mesh.shape['sequence']
  act_bytes = np.dtype(m.dtype).itemsize
  hd = m.head_dim or m.d_model // m.n_heads
  # Saved residual per layer (remat) or ~all intermediates of a block (no remat),
  # plus one block's working set and fp32 logits; a first-order estimate.
  per_layer_full = tokens * (10 * m.d_model + 3 * m.mlp_dim // mesh.shape['tensor']
                             + 2 * m.n_heads * hd // mesh.shape['tensor'])
  per_layer_saved = tokens * m.d_model if m.remat == 'full' else per_layer_full
  acts = act_bytes * (m.n_layers * per_layer_saved + per_layer_full)
  acts += 4 * 2 * tokens * m.vocab_size // mesh.shape['tensor']
  params_dev, opt_dev = per_device(st.params), per_device(st.opt_state)
  print(f'config      {cfg.name}')
  print(f'mesh        {dict(mesh.shape)} = {n_dev} devices')
  print(f'parameters  {setup.n_params:,} ({setup.n_params / 1e9:.2f}B)')
  print(f'params      {_gib(total(st.params))} total, {_gib(params_dev)} per device')
  print(f'opt state   {_gib(total(st.opt_state))} total, {_gib(opt_dev)} per device')
  print(f'activations ~{_gib(acts)} per device (estimate: batch {local_batch}/device, '
        f"remat '{m.remat}')")
  print(f'per device  {_gib(params_dev + opt_dev)} params+opt state, '
        f'~{_gib(params_dev + opt_dev + acts)} with activations')
  if isinstance(mesh, jax.sharding.Mesh) and n_dev == jax.device_count() and setup.n_params < 5e9:
    mem = setup.train_step_memory()
    if mem is not None:
      print(f'compiled    args {_gib(mem.argument_size_in_bytes)}, temps '
            f'{_gib(mem.temp_size_in_bytes)}, outputs {_gib(mem.output_size_in_bytes)} '
            f'(per device, from XLA)')
  else:
    print(f'compiled    skipped: the mesh needs {n_dev} devices, this host has '
          f'{jax.device_count()} (or the model is too large to compile here)')
  return 0
