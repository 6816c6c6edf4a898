"""A model on a mesh: ``Setup`` (model, optimizer, shardings, compiled steps) and ``load``.

Everything that runs a model needs this and nothing of the train loop:
``jaxlm.run.loop`` (training), ``jaxlm.run.finetune``, ``jaxlm.cli.convert`` (HF
import/export), the eval and generate commands, and bench/. ``load(path)``
gives a ready model from a jaxlm workdir or a Hugging Face directory;
``generate_text(path, prompts)`` is the one-call text-in/text-out API.
"""

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxlm.checkpoint.checkpointer import restore_params
from jaxlm.configs import base as base_config
from jaxlm.core import config as config_lib
from jaxlm.core import mesh as mesh_lib
from jaxlm.core import platform, sharding, storage
from jaxlm.core.errors import CheckpointError, ConfigError
from jaxlm.core.tree import misfits, shapes
from jaxlm.data.packing import BATCH_KEYS
from jaxlm.data.tokenizers import get_tokenizer
from jaxlm.engine.generate import generate
from jaxlm.hf import weights as hf
from jaxlm.model import pipeline
from jaxlm.model.transformer import build_model, param_count
from jaxlm.optim.optimizer import horizon, make_optimizer, schedule
from jaxlm.optim.step import TrainState, make_eval_step, make_train_step, new_state

log = logging.getLogger('jaxlm')


def check_divisibility(cfg, mesh) -> None:
  """Batch and length must split evenly over the mesh; says which fields to change."""
  dp = mesh_lib.data_parallel_size(mesh)
  micro = cfg.train.batch_size // cfg.train.grad_accum
  if micro % dp:
    raise ConfigError(
        f'train.batch_size={cfg.train.batch_size} (/ train.grad_accum={cfg.train.grad_accum}) '
        f'does not divide over {dp} data-parallel devices (mesh.data x mesh.fsdp x mesh.expert)')
  eval_bs = config_lib.eval_batch_size(cfg)
  if eval_bs % dp:
    raise ConfigError(f'eval.batch_size={eval_bs} does not divide over {dp} data-parallel devices')
  if cfg.data.seq_len % mesh.shape['sequence']:
    raise ConfigError(f"data.seq_len={cfg.data.seq_len} does not divide over "
                      f"mesh.sequence={mesh.shape['sequence']}")
  tensor = mesh.shape['tensor']
  for key in ('n_heads', 'mlp_dim', 'moe_mlp_dim'):
    if cfg.model[key] % tensor:
      raise ConfigError(f'model.{key}={cfg.model[key]} does not divide over mesh.tensor={tensor}')
  stages = mesh_lib.pipeline_stages(mesh)
  pipeline.check(cfg.model, stages, micro, dp)
  pipeline.check(cfg.model, stages, eval_bs // eval_micro_batches(cfg, mesh), dp)
  expert = mesh.shape.get('expert', 1)
  if expert > 1 and cfg.model.moe_experts % expert:
    raise ConfigError(f'model.moe_experts={cfg.model.moe_experts} does not divide over '
                      f'mesh.expert={expert}')


def eval_micro_batches(cfg, mesh) -> int:
  """Slices an eval batch runs in: the fewest with at most a train micro-batch of
  rows each that still split evenly over the data-parallel devices."""
  dp = mesh_lib.data_parallel_size(mesh)
  rows, micro = config_lib.eval_batch_size(cfg), cfg.train.batch_size // cfg.train.grad_accum
  return next(n for n in range(-(-rows // micro), rows + 1)
              if rows % n == 0 and (rows // n) % dp == 0)


class Setup:
  """Model, optimizer, shardings and compiled steps for a config on a mesh (no data)."""

  def __init__(self, cfg, mesh=None):
    self.cfg = cfg
    self.mesh = mesh or mesh_lib.make_mesh(cfg.mesh)
    check_divisibility(cfg, self.mesh)
    # What the steps are built for: the mesh's devices (compile-only ones included).
    self.platform = platform.of_mesh(self.mesh)
    self.rules = sharding.rules_for(cfg.model, cfg.mesh, self.mesh)
    self.model = build_model(cfg.model)
    self.tx = make_optimizer(cfg.optim, horizon(cfg))
    self.lr = schedule(cfg.optim, horizon(cfg))
    # Init runs outside sharding.activate: DenseGeneral reshapes its kernel
    # after init, which a live rank-3 constraint on a rank-2 array rejects.
    with platform.building(self.platform):
      boxed = jax.eval_shape(self._init_boxed, jax.random.key(cfg.train.seed))
    self.state_shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(boxed), self.mesh, self.rules)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(boxed), self.state_shardings)
    self.n_params = param_count(self.abstract_state.params)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    repl = sharding.replicated(self.mesh)
    options = platform.step_compiler_options(self.platform)
    self._train_step = jax.jit(
        make_train_step(self.model, self.tx, self.lr, cfg.train.grad_accum, cfg.train.z_loss,
                        cfg.train.spike_factor),
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, repl), donate_argnums=(0,),
        compiler_options=options)
    self._eval_step = jax.jit(make_eval_step(self.model, eval_micro_batches(cfg, self.mesh)),
                              in_shardings=(self.state_shardings.params, self.batch_sharding),
                              out_shardings=repl, compiler_options=options)

  def _init_boxed(self, rng):
    tokens = jnp.zeros((1, self.cfg.data.seq_len), jnp.int32)
    params = self.model.init(rng, tokens)['params']
    return new_state(params, self.tx.init(params))

  def init_state(self) -> TrainState:
    key = jax.random.key(self.cfg.train.seed)
    init = jax.jit(lambda r: nn.unbox(self._init_boxed(r)), out_shardings=self.state_shardings)
    with platform.building(self.platform):
      lowered = init.lower(key)
    return lowered.compile(platform.init_compiler_options(self.platform))(key)

  def state_from_params(self, params, step: int = 0) -> TrainState:
    """A TrainState around ``params`` with a fresh optimizer state (e.g. after an HF import)."""
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    return new_state(params, opt_state,
                     jax.device_put(jnp.asarray(step, jnp.int32), self.state_shardings.step))

  def compile_train_step(self):
    """The train step compiled for this mesh's devices (compile-only ones too), not run."""
    shape = (self.cfg.train.batch_size, self.cfg.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == 'loss_mask' else np.int32,
                                     sharding=self.batch_sharding)
             for k in BATCH_KEYS}
    with sharding.activate(self.mesh, self.rules):
      return self._train_step.lower(self.abstract_state, batch).compile()

  def train_step_memory(self):
    """XLA's memory analysis of the compiled train step, per device (None if unavailable)."""
    return self.compile_train_step().memory_analysis()

  def device_batch(self, local: dict) -> dict:
    """Per-process numpy rows -> global arrays sharded over the batch axes."""
    local = {k: np.asarray(v) for k, v in local.items()}
    if jax.process_count() == 1:
      # One batched transfer: make_array_from_process_local_data costs ~0.7 ms per
      # array in Python, which is 10% of a small model's CPU step.
      return jax.device_put(local, self.batch_sharding)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()}

  def train_step(self, state, batch):
    with sharding.activate(self.mesh, self.rules):
      return self._train_step(state, batch)

  def eval_loss(self, params, batches) -> float:
    with sharding.activate(self.mesh, self.rules):
      # Read back once at the end: a float() per batch would stall dispatch each time.
      sums = [self._eval_step(params, self.device_batch(b)) for b in batches]
    total, count = (float(np.sum(np.asarray(x, np.float64))) for x in zip(*jax.device_get(sums)))
    return total / max(count, 1.0)

  def generate_text(self, params, tokenizer, prompts, **kw) -> list[str]:
    ids = [list(map(int, tokenizer.encode(p))) for p in prompts]
    if tokenizer.bos_id is not None and self.cfg.data.add_bos:
      ids = [[tokenizer.bos_id] + i for i in ids]
    stops = tuple(t for t in (tokenizer.eos_id,) if t is not None)
    with sharding.activate(self.mesh, self.rules):
      out = generate(self.model, params, ids, stop_ids=stops, **kw)
    return [tokenizer.decode(o) for o in out]


def config_from_hf(hf_dir: str, hf_cfg: dict):
  """A full jaxlm config: base defaults with the model section from an HF config."""
  cfg = base_config.get_config()
  cfg.name = f"hf-{hf_cfg.get('model_type', 'model')}"
  for k, v in hf.model_fields(hf_cfg).items():
    cfg.model[k] = type(cfg.model[k])(v)
  cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_seq_len)
  tok = Path(hf_dir) / 'tokenizer.json'
  if tok.is_file():
    cfg.data.tokenizer, cfg.data.tokenizer_path = 'hf', str(tok.resolve())
  config_lib.validate(cfg, need_data=False)
  return cfg


def check_placeable(setup) -> None:
  """ConfigError naming a parameter whose shape does not split over this mesh."""
  bad = sharding.indivisible(setup.abstract_state.params)
  if bad:
    raise ConfigError(f'the model cannot be placed on this mesh: {bad} (choose mesh sizes that '
                      'divide it)')


def device_params(setup, np_params):
  """numpy params -> arrays sharded like ``setup.abstract_state.params``, checked by name."""
  want, got = shapes(setup.abstract_state.params), shapes(np_params)
  bad = misfits(want, got)
  missing, extra = sorted(set(want) - set(got)), sorted(k for k, _, w in bad if w is None)
  if missing or extra:
    raise CheckpointError(f'converted parameters do not match the model: missing {missing[:3]}, '
                          f'unexpected {extra[:3]}')
  if bad:
    k, shape, expected = bad[0]
    raise CheckpointError(f'converted parameter {k} has shape {shape}, '
                          f'the model expects {expected}')
  check_placeable(setup)
  return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding),
                      np_params, setup.abstract_state.params)


@dataclasses.dataclass
class Loaded:
  """A model ready to run: its config, Setup (mesh, model, shardings) and sharded params."""
  cfg: object
  setup: object
  params: object
  step: int


def is_workdir(path) -> bool:
  """Whether ``path`` (local or gs://, s3://) holds config.json and checkpoints/."""
  p = storage.path(path)
  return (p / 'checkpoints').is_dir() and (p / 'config.json').is_file()


def load(path: str, restore_step: int | None = None, mesh_overrides: dict | None = None) -> Loaded:
  """Params and model of a jaxlm workdir (params-only restore) or an HF directory.

  The saved mesh is kept when it fits this host's devices, else replaced by
  pure data parallelism (the checkpoint reshards). ``mesh_overrides`` (e.g.
  ``{'fsdp': 4, 'tensor': 2, 'data': 1}``) sets mesh fields explicitly.
  """
  p = storage.path(path)
  if is_workdir(p):
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
    return Loaded(cfg, setup, device_params(setup, hf.to_params(hf_tensors, cfg.model)), 0)
  params, step = restore_params(path, cfg.checkpoint, setup.abstract_state, restore_step)
  return Loaded(cfg, setup, params, step)


def generate_text(path: str, prompts, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  restore_step: int | None = None):
  """Text in, text out, from a jaxlm workdir or a Hugging Face model directory.

  ``prompts``: one string (returns one string) or a list (returns a list); the
  continuation only, cut at the tokenizer's EOS. Loads the model on every call;
  for many calls use ``jaxlm.load`` once and ``Setup.generate_text``.

      import jaxlm
      print(jaxlm.generate_text('runs/demo', 'def ', max_new_tokens=100))
  """
  single = isinstance(prompts, str)
  loaded = load(path, restore_step)
  texts = loaded.setup.generate_text(
      loaded.params, get_tokenizer(loaded.cfg.data), [prompts] if single else list(prompts),
      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
  return texts[0] if single else texts
