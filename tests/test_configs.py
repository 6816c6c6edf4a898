"""Every configs/*.py loads the way the CLI loads it, is locked, validates, and has the right size.

No jax here: parameter counts come from the architecture numbers by a closed form.
"""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections.config_flags import config_flags

from jaxlm.core import config as config_lib

CONFIGS = Path(__file__).resolve().parents[1] / 'jaxlm' / 'configs'
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
SIZE_FILES = sorted(p.name for p in CONFIGS.glob('*.py') if p.name not in ('base.py', '__init__.py'))

# Published parameter counts (Hugging Face checkpoints, unpadded vocab) and tolerance.
PUBLISHED = {
    'gpt2_small.py': (124_439_808, 0.03),  # openai-community/gpt2
    'gpt2_medium.py': (354_823_168, 0.03),  # openai-community/gpt2-medium
    'llama_1b.py': (1_235_814_400, 0.05),  # meta-llama/Llama-3.2-1B
    'llama_8b.py': (8_030_261_248, 0.03),  # meta-llama/Meta-Llama-3-8B
    'llama_70b.py': (70_553_706_496, 0.03),  # meta-llama/Meta-Llama-3-70B
    'llama_405b.py': (405_853_388_800, 0.03),  # meta-llama/Llama-3.1-405B
    'mixtral_8x7b.py': (46_702_792_704, 0.0),  # mistralai/Mixtral-8x7B-v0.1
}


def load(name: str, *overrides: str):
  """Loads configs/<name> through ml_collections' config_flags, as `jaxlm --config=` does."""
  argv = ['prog', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', str(CONFIGS / name), flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def n_params(m) -> int:
  """Parameter count of jaxlm.model.Transformer for model config ``m``."""
  d, hd = m.d_model, m.head_dim or m.d_model // m.n_heads
  bias = int(m.use_bias)
  qkv = (m.n_heads + 2 * m.n_kv_heads) * hd
  attn = d * qkv + m.n_heads * hd * d + bias * (qkv + d)
  n_in = 2 if m.activation == 'swiglu' else 1  # SwiGLU has gate and up projections
  mlp = (n_in + 1) * d * m.mlp_dim + bias * (n_in * m.mlp_dim + d)
  if m.moe_experts:  # router + routed experts (+ shared experts as one wider MLP); moe_every 1
    f = m.moe_mlp_dim or m.mlp_dim
    mlp = d * m.moe_experts + (m.moe_experts + m.moe_shared_experts) * 3 * d * f
  norm = d * (2 if m.norm == 'layernorm' and m.use_bias else 1)  # scale (+ bias)
  embed = m.vocab_size * d * (1 if m.tie_embeddings else 2)
  positions = m.max_seq_len * d if m.position == 'learned' else 0
  return m.n_layers * (attn + mlp + 2 * norm) + embed + positions + norm


def test_every_config_is_covered():
  assert {'tiny.py', 'demo.py', 'shakespeare_char.py', *PUBLISHED} <= set(SIZE_FILES)


@pytest.mark.parametrize('name', SIZE_FILES)
def test_config_is_locked_base_shaped_and_valid(name):
  cfg = load(name)
  base = load('base.py')
  # config_flags locks what it loads; the size file locks too, so its own typos raise.
  assert runpy.run_path(str(CONFIGS / name))['get_config']().is_locked
  with pytest.raises(AttributeError):
    cfg.model.not_a_field = 1
  with pytest.raises(AttributeError):
    cfg.not_a_section = 1
  flat, flat_base = config_lib.flatten(cfg), config_lib.flatten(base)
  assert flat.keys() == flat_base.keys()
  for key, value in flat.items():
    assert type(value) is type(flat_base[key]), f'{name}: {key} changed type'
  assert cfg.name == name.removesuffix('.py')
  # Large configs leave paths to the command line; fill them so validation checks the rest.
  cfg.data.path = cfg.data.path or '/data/train'
  cfg.data.tokenizer_path = cfg.data.tokenizer_path or '/data/tokenizer.json'
  config_lib.validate(cfg)


def test_command_line_overrides_and_typos():
  assert load('tiny.py', '--config.model.d_model=64').model.d_model == 64
  with pytest.raises(Exception, match='not_a_field'):
    load('tiny.py', '--config.model.not_a_field=1')


def _bare_env():
  # PYTHONPATH is kept only when set (a worktree run): the installed package is what is tested.
  env = {'PATH': '/usr/bin:/bin'}
  if os.environ.get('PYTHONPATH'):
    env['PYTHONPATH'] = os.environ['PYTHONPATH']
  return env


def test_loads_without_repo_root_on_sys_path(tmp_path):
  code = ('import sys; from absl import flags; from ml_collections.config_flags import config_flags\n'
          f'config_flags.DEFINE_config_file("config", {str(CONFIGS / "llama_8b.py")!r})\n'
          'flags.FLAGS(["prog"]); print(flags.FLAGS.config.model.d_model)')
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                       text=True, env=_bare_env(), check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '4096'


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
  expected, tol = PUBLISHED[name]
  got = n_params(load(name).model)
  assert abs(got - expected) <= tol * expected, f'{name}: {got:,} params, published {expected:,}'


def test_mixtral_active_parameters_match_published():
  from jaxlm.run.metrics import active_params  # noqa: PLC0415
  m = load('mixtral_8x7b.py').model
  # "13B active parameters" (Mixtral paper); 12.9B by the same per-layer count as HF.
  assert active_params(m, n_params(m)) == 12_879_925_248


def test_parameter_formula_is_exact_for_unpadded_vocab():
  # Llama's vocab is not padded, so the formula must hit the published count exactly.
  assert n_params(load('llama_1b.py').model) == PUBLISHED['llama_1b.py'][0]
  assert n_params(load('llama_8b.py').model) == PUBLISHED['llama_8b.py'][0]
  assert n_params(load('llama_70b.py').model) == PUBLISHED['llama_70b.py'][0]
  gpt2 = load('gpt2_small.py', '--config.model.vocab_size=50257').model
  assert n_params(gpt2) == PUBLISHED['gpt2_small.py'][0]


@pytest.mark.parametrize('name', ['mixtral_8x7b.py', 'tiny_moe.py'])
def test_moe_formula_counts_the_built_model(name):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jaxlm.model.transformer import build_model, param_count  # noqa: PLC0415
  m = load(name).model
  model = build_model(m)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  assert param_count(shapes['params']) == n_params(m)


def documented_target(name: str) -> dict:
  """The ``Target: `--target=... --devices=N``` line of a config's docstring as flags."""
  import ast  # noqa: PLC0415
  import re  # noqa: PLC0415
  doc = ast.get_docstring(ast.parse((CONFIGS / name).read_text())) or ''
  line = re.search(r'^Target: `([^`]*)`', doc, re.M)
  assert line, f'{name}: its docstring names no "Target: `--target=... --devices=N`"'
  flags_ = dict(re.findall(r'--(\w+)=(\S+)', line.group(1)))
  assert set(flags_) <= {'target', 'devices', 'slices'}, flags_
  return flags_


@pytest.mark.parametrize('name', SIZE_FILES)
def test_config_builds_its_mesh_for_the_hardware_its_docstring_names(name):
  """Mesh axes resolve for the documented device count, batch and heads divide over it, and
  every parameter splits over it (an abstract mesh: shapes only, nothing compiled)."""
  import jax  # noqa: PLC0415
  from jaxlm.cli import targets  # noqa: PLC0415
  from jaxlm.core import mesh as mesh_lib  # noqa: PLC0415
  from jaxlm.core.sharding import MESH_AXES  # noqa: PLC0415
  from jaxlm.engine.build import Setup, check_placeable  # noqa: PLC0415
  want = documented_target(name)
  slices = int(want.get('slices', 1))
  devices = int(want.get('devices', 0))
  if 'target' in want:
    devices = targets.parse(want['target'], devices, slices).devices
  cfg = load(name)
  cfg.data.path = cfg.data.path or '/data/train'
  cfg.data.tokenizer_path = cfg.data.tokenizer_path or '/data/tokenizer.json'
  config_lib.validate(cfg)
  ici, dcn = mesh_lib.mesh_shape(cfg.mesh, devices, slices)
  shape = tuple(i * d for i, d in zip(ici, dcn))
  setup = Setup(cfg, jax.sharding.AbstractMesh(shape, MESH_AXES))
  assert setup.mesh.size == devices
  check_placeable(setup)
