"""Shared fixtures: 8 fake CPU devices, the tiny config, the shared corpus."""

import importlib
import os
import sys
from pathlib import Path

# Must precede any jax import in the test process.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt'
sys.path.insert(0, str(REPO))


def train_and_collect(cfg, workdir, devices=None) -> dict:
  """Trains ``cfg`` in ``workdir`` (a Path); {'loss', 'grad_norm': [logged steps] arrays,
  'params': the final checkpoint's parameters (numpy)}: what the layout tests compare."""
  import json  # noqa: PLC0415
  import jax  # noqa: PLC0415  (after the device-count flag above)
  import numpy as np  # noqa: PLC0415
  from jaxlm.engine import build as engine  # noqa: PLC0415
  from jaxlm.run.loop import Trainer  # noqa: PLC0415
  Trainer(cfg, str(workdir), devices=devices).run()
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  out = {k: np.array([r[f'train/{k}'] for r in rows if 'train/loss' in r])
         for k in ('loss', 'grad_norm')}
  out['params'] = jax.device_get(engine.load(str(workdir)).params)
  return out


def load_config(name: str):
  """jaxlm/configs/<name>.py's get_config()."""
  return importlib.import_module(f'jaxlm.configs.{name}').get_config()


@pytest.fixture
def tiny_cfg(tmp_path):
  """The tiny config reading a small slice of Shakespeare (fast to tokenize)."""
  text = SHAKESPEARE.read_text()[:60_000]
  path = tmp_path / 'shakespeare.txt'
  path.write_text(text)
  cfg = load_config('tiny')
  cfg.data.path = str(path)
  return cfg


@pytest.fixture
def repo():
  return REPO


@pytest.fixture(params=['cpu-path', 'accelerator-path'])
def code_path(request):
  """Runs a test twice: as CPU steps are built, and as GPU/TPU steps are (no XLA:CPU-only
  Dense backward or options; jaxlm.core.platform.accelerator_path), so both backwards are checked."""
  from jaxlm.core import platform  # noqa: PLC0415
  if request.param == 'cpu-path':
    yield request.param
    return
  with platform.accelerator_path():
    yield request.param
