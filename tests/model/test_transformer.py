"""The model: causal, document-isolated, GPT-2 and Llama variants, scan/remat equivalence."""

import functools

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


TOKENS = (np.arange(8 * 64).reshape(8, 64) * 7) % 250  # [batch, length]: enough activations to matter


def _grad(model, params):
  """(d(sum of logits)/d(params) on TOKENS, compiled temp bytes), compiled once."""
  compiled = jax.jit(jax.grad(lambda p: model.apply({'params': p}, TOKENS).sum())).lower(
      params).compile()
  return compiled(params), compiled.memory_analysis().temp_size_in_bytes


@functools.cache
def _reference_grads(code_path):
  """Gradients and compiled temp bytes of the scanned model without remat (``code_path``:
  the cache key; the code_path fixture sets which backward is traced)."""
  return _grad(*_model('llama', remat='none'))


@functools.cache
def _scanned_grads(remat, code_path):
  """Gradients and compiled temp bytes of the scanned model with this remat policy."""
  return _grad(*_model('llama', remat=remat))


@pytest.mark.parametrize('remat', ['none', 'full', 'dots', 'minimal'])
def test_scan_and_remat_do_not_change_outputs(remat, code_path):
  model_scan, params = _model('llama', remat=remat)
  model_loop, _ = _model('llama', scan_layers=False, remat=remat)
  # Unstack the scanned [layers, ...] params into layer_i.
  stacked = params['layers']
  loop_params = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(model_scan.cfg.n_layers):
    loop_params[f'layer_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  a = _apply(model_scan, params, TOKENS)
  b = _apply(model_loop, loop_params, TOKENS)
  np.testing.assert_allclose(a, b, atol=1e-5)

  # Remat changes only the backward pass, and scan only how layers are compiled: every
  # gradient leaf must equal the scanned no-remat model's (the loop model's once, at
  # remat 'none'), and remat must buy memory.
  want, none_temp = _reference_grads(code_path)
  if remat == 'none':
    got_loop, _ = _grad(model_loop, loop_params)
    got = {**{k: v for k, v in got_loop.items() if not k.startswith('layer_')},
           'layers': jax.tree.map(lambda *xs: jnp.stack(xs),
                                  *[got_loop[f'layer_{i}'] for i in range(model_scan.cfg.n_layers)])}
  else:
    got, temp = _scanned_grads(remat, code_path)
    assert temp < 0.75 * none_temp, (remat, temp, none_temp)  # 8x64 tokens: 3.3 / 4.3 vs 7.5 MB
    if remat == 'minimal':  # keeps attention's q/k/v/output/out-projection that 'full' recomputes
      assert temp > _scanned_grads('full', code_path)[1], temp
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_bf16_compute_with_fp32_params():
  model, params = _model('llama', dtype='bfloat16', param_dtype='float32')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = np.arange(16)[None]
  logits = _apply(model, params, tokens)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  # model.dtype reaches the matmuls: q, k, v, out, gate, up, down and the head (at least)
  # multiply bf16 operands; the fp32 model multiplies none.
  def bf16_dots(m):
    hlo = jax.jit(m.apply).lower({'params': params}, tokens).as_text()
    return [l for l in hlo.splitlines()
            if 'dot_general' in l and l.split(' : (')[-1].split('->')[0].count('bf16') == 2]
  assert len(bf16_dots(model)) >= 8
  model32, _ = _model('llama', dtype='float32', param_dtype='float32')
  assert not bf16_dots(model32)
  # ... and the result differs from fp32 compute by bf16 rounding, not by float noise.
  diff = np.abs(np.asarray(logits) - np.asarray(_apply(model32, params, tokens))).max()
  assert diff > 1e-4, diff
