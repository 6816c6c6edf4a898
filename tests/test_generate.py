"""jaxlm.engine.generate: KV-cache decoding equals full recompute; stops, top-k, sharded params, API."""

import jax
import numpy as np
import pytest
from flax import linen as nn

import jaxlm
from conftest import load_config
from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.core import config as config_lib
from jaxlm.core import sharding
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.engine.build import Setup
from jaxlm.engine.generate import generate
from jaxlm.model.transformer import build_model
from jaxlm.optim.step import new_state

PROMPTS = [[72, 101, 108], [1, 2, 3, 4, 5, 6, 7], [200]]  # lengths 3, 7, 1: left padding
NEW = 8


# Model families the KV cache must serve; MoE and sliding-window variants join as they land.
VARIANTS = {
    'gpt2': {},
    'llama': dict(position='rope', norm='rmsnorm', activation='swiglu', use_bias=False,
                  tie_embeddings=False, n_kv_heads=2),  # RoPE positions, GQA cache (2 of 4 heads)
}


def _tiny(variant='gpt2'):
  cfg = load_config('tiny')
  cfg.model.init_std = 0.3  # peaked logits: no near-ties for float noise to flip
  for k, v in VARIANTS[variant].items():
    cfg.model[k] = v
  model = build_model(cfg.model)
  params = model.init(jax.random.key(1), np.zeros((1, 8), np.int32))['params']
  return cfg, model, nn.unbox(params)


@pytest.fixture(scope='module')
def tiny():
  return _tiny()


def _recompute_greedy(model, params, prompt, n):
  """No cache: the whole sequence is re-run for every token. Later slots hold zeros,
  which causal attention keeps from affecting earlier logits, so one width compiles once."""
  forward = jax.jit(lambda p, t: model.apply({'params': p}, t))
  ids = np.zeros((1, 7 + NEW), np.int32)
  ids[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + n):
    ids[0, i] = int(np.argmax(forward(params, ids)[0, i - 1]))
  return ids[0, len(prompt):len(prompt) + n].tolist()


@pytest.mark.parametrize('variant', VARIANTS)
def test_kv_cache_greedy_matches_full_recompute_with_left_padding(variant, tiny):
  _, model, params = tiny if variant == 'gpt2' else _tiny(variant)
  got = generate(model, params, PROMPTS, max_new_tokens=NEW, temperature=0.0)
  want = [_recompute_greedy(model, params, p, NEW) for p in PROMPTS]
  assert got == want
  assert len({tuple(w) for w in want}) == 3  # the prompts do lead to different outputs


def test_sliding_window_kv_cache_matches_full_recompute(tiny):
  """model.sliding_window in the decode path: the chunked kernel over the cache equals the
  windowed xla reference run without a cache, and the window does change the tokens."""
  cfg, model, params = tiny
  windowed = lambda attn: build_model({**cfg.model.to_dict(), 'sliding_window': 3,
                                       'attention': attn})
  got = generate(windowed('chunked'), params, PROMPTS, max_new_tokens=NEW, temperature=0.0)
  want = [_recompute_greedy(windowed('xla'), params, p, NEW) for p in PROMPTS]
  assert got == want
  assert got != generate(model, params, PROMPTS, max_new_tokens=NEW, temperature=0.0)


def test_stop_tokens_cut_and_top_k_one_is_greedy(tiny):
  _, model, params = tiny
  greedy = generate(model, params, PROMPTS, max_new_tokens=NEW, temperature=0.0)
  stop = greedy[1][4]
  cut = generate(model, params, PROMPTS, max_new_tokens=NEW, temperature=0.0, stop_ids=(stop,))
  for g, c in zip(greedy, cut):
    assert c == (g[:g.index(stop)] if stop in g else g)
  assert len(cut[1]) <= 4
  top1 = generate(model, params, PROMPTS, max_new_tokens=NEW, temperature=1.0, top_k=1, seed=3)
  assert top1 == greedy


def test_params_sharded_fsdp4_tensor2_give_the_same_tokens(tiny):
  cfg, model, params = tiny
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
  setup = Setup(cfg)
  sharded = jax.device_put(params, setup.state_shardings.params)
  kernel = sharded['layers']['mlp']['up']['kernel']
  assert not kernel.sharding.is_fully_replicated
  with sharding.activate(setup.mesh, setup.rules):
    got = generate(setup.model, sharded, PROMPTS, max_new_tokens=NEW, temperature=0.0)
  assert got == generate(model, params, PROMPTS, max_new_tokens=NEW, temperature=0.0)


def test_generate_text_api_reads_a_workdir(tiny, tmp_path):
  cfg, model, params = tiny
  cfg = cfg.copy_and_resolve_references()
  cfg.checkpoint.async_save = False
  setup = Setup(cfg)
  sharded = jax.device_put(params, setup.state_shardings.params)
  state = new_state(sharded, jax.jit(setup.tx.init)(sharded), step=5)
  config_lib.save(cfg, str(tmp_path))
  ckpt = Checkpointer(str(tmp_path), cfg.checkpoint)
  ckpt.save(5, state, None, force=True)
  ckpt.close()
  tok = ByteTokenizer()
  want = generate(model, params, [list(tok.encode('Hel'))], max_new_tokens=6, temperature=0.0,
                  stop_ids=(tok.eos_id,))[0]
  texts = jaxlm.generate_text(str(tmp_path), ['Hel', 'x'], max_new_tokens=6)
  assert len(texts) == 2 and texts[0] == tok.decode(want)
