"""checkpoint.keep and keep_period: exactly the last ``keep`` steps plus every
``keep_period``-th, with counts where keep and keep + 1 give different steps."""

import jax.numpy as jnp
import pytest

from conftest import load_config
from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.optim.step import new_state


@pytest.mark.parametrize('keep,period,want', [(2, 0, [6, 7]), (3, 0, [5, 6, 7]),
                                              (2, 3, [3, 6, 7]), (1, 4, [4, 7])])
def test_keep_last_k_and_every_period(keep, period, want, tmp_path):
  c = load_config('tiny').checkpoint
  c.keep, c.keep_period, c.async_save = keep, period, False
  params = {'w': jnp.ones((2,), jnp.float32)}
  with Checkpointer(str(tmp_path), c) as ckpt:
    for step in range(1, 8):
      assert ckpt.save(step, new_state(params, {'m': jnp.zeros((2,))}, step), None, force=True)
    ckpt.wait()
    assert ckpt.steps() == want
