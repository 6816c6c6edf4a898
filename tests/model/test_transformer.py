"""The model: causal, document-isolated, GPT-2 and Llama variants, scan/remat equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import load_config
from jaxlm.model.transformer import build_model

VARIANTS = {
    'gpt2': {},
    'llama': dict(position='rope', norm='rmsnorm', activation='swiglu', use_bias=False,
                  tie_embeddings=False, n_kv_heads=2),
}


def _model(variant, **kw):
  cfg = load_config('tiny').model
  with cfg.unlocked():
    for k, v in {**VARIANTS[variant], **kw}.items():
      cfg[k] = v
  model = build_model(cfg)
  tokens = jnp.zeros((1, 16), jnp.int32)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), tokens)['params']))()
  return model, params


def _apply(model, params, *args):
  return jax.jit(model.apply)({'params': params}, *args)


@pytest.mark.parametrize('variant', VARIANTS)
def test_logits_at_t_ignore_later_tokens(variant):
  model, params = _model(variant)
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (2, 16))
  b = a.copy()
  b[:, 9:] = rng.integers(0, 256, (2, 7))
  la, lb = _apply(model, params, a), _apply(model, params, b)
  np.testing.assert_allclose(la[:, :9], lb[:, :9], atol=1e-5)
  assert np.abs(np.asarray(la[:, 9:] - lb[:, 9:])).max() > 1e-3


@pytest.mark.parametrize('variant', VARIANTS)
def test_packed_documents_do_not_see_each_other(variant):
  model, params = _model(variant)
  rng = np.random.default_rng(1)
  doc1, doc2 = rng.integers(0, 256, 6), rng.integers(0, 256, 10)
  packed = np.concatenate([doc1, doc2])[None]
  seg = np.array([[1] * 6 + [2] * 10])
  pos = np.array([list(range(6)) + list(range(10))])
  out = _apply(model, params, packed, pos, seg)
  alone1 = _apply(model, params, doc1[None])
  alone2 = _apply(model, params, doc2[None])
  np.testing.assert_allclose(out[:, :6], alone1, atol=1e-5)
  np.testing.assert_allclose(out[:, 6:], alone2, atol=1e-5)


def test_variant_parameters_differ_as_configured():
  _, gpt = _model('gpt2')
  _, llama = _model('llama')
  assert 'pos_embed' in gpt and 'head' not in gpt
  assert 'pos_embed' not in llama and 'head' in llama
  assert 'gate' in llama['layers']['mlp'] and 'bias' not in llama['layers']['mlp']['up']
  # GQA: 4 query heads share 2 kv heads.
  assert llama['layers']['attn']['key']['kernel'].shape[-2] == 2
  assert llama['layers']['attn']['query']['kernel'].shape[-2] == 4


@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_scan_and_remat_do_not_change_outputs(remat):
  model_scan, params = _model('llama', remat=remat)
  model_loop, _ = _model('llama', scan_layers=False, remat=remat)
  # Unstack the scanned [layers, ...] params into layer_i.
  stacked = params['layers']
  loop_params = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(model_scan.cfg.n_layers):
    loop_params[f'layer_{i}'] = jax.tree.map(lambda x: x[i], stacked)
  tokens = np.arange(16)[None] % 50
  a = _apply(model_scan, params, tokens)
  b = _apply(model_loop, loop_params, tokens)
  np.testing.assert_allclose(a, b, atol=1e-5)
  ga = jax.jit(jax.grad(lambda p: model_scan.apply({'params': p}, tokens).sum()))(params)
  assert np.isfinite(jax.tree.leaves(ga)[0]).all()


def test_bf16_compute_with_fp32_params():
  model, params = _model('llama', dtype='bfloat16', param_dtype='float32')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = _apply(model, params, np.arange(16)[None])
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
