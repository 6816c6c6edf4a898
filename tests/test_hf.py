"""jaxlm.hf.weights families: each imports and exports with transformers' logits (1e-4), 1 and 8 devices."""

import json

import numpy as np
import pytest

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')

from jaxlm.cli import main as cli, convert  # noqa: E402
from jaxlm.core.errors import ConfigError  # noqa: E402
from jaxlm.hf import weights as hf  # noqa: E402

TOKENS = np.array([[5, 17, 250, 3, 99, 42, 7, 0, 299, 12, 64, 1, 77, 31, 200, 9, 4, 150, 60, 2],
                   [8, 8, 8, 200, 100, 50, 25, 12, 6, 3, 1, 0, 5, 5, 280, 140, 70, 35, 17, 8]],
                  np.int32)
_LLAMA = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
              initializer_range=0.2)

# name -> (transformers config class, model class, config kwargs). Shapes differ per family
# so a transposed or mis-split tensor cannot line up by accident.
FAMILIES = {
    # Llama 3.1 long-context RoPE (all three wavelength bands hit at head_dim 12) and
    # Llama 3.2's tied embeddings.
    'llama3': ('LlamaConfig', 'LlamaForCausalLM', dict(
        _LLAMA, tie_word_embeddings=True,
        rope_parameters={'rope_type': 'llama3', 'rope_theta': 500.0, 'factor': 4.0,
                         'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                         'original_max_position_embeddings': 32})),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', dict(_LLAMA, hidden_size=32, num_key_value_heads=1)),
    'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM', dict(_LLAMA, head_dim=16, num_key_value_heads=4)),
    # A window shorter than the test sequence (20), so the mask matters.
    'mistral': ('MistralConfig', 'MistralForCausalLM', dict(_LLAMA, hidden_size=64,
                                                          sliding_window=5)),
}


def _tiny_hf(kind: str, path):
  torch.manual_seed(0)
  cfg_cls, model_cls, kw = FAMILIES[kind]
  model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw))
  with torch.no_grad():  # random norms and biases, so a dropped or swapped one shows up
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        p.add_(0.3 * torch.randn_like(p))
  model.eval().save_pretrained(str(path))
  return model


def _hf_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()


def _jax_logits(loaded) -> np.ndarray:
  """The HF vocabulary's logits (jaxlm pads the vocab to a multiple of 128 and masks the rest)."""
  return np.asarray(loaded.setup.model.apply({'params': loaded.params}, TOKENS))[..., :300]


@pytest.mark.parametrize('kind', sorted(FAMILIES))
def test_family_imports_and_exports_with_transformers_logits(kind, tmp_path):
  hf_model = _tiny_hf(kind, tmp_path / 'hf')
  want = _hf_logits(hf_model)
  assert np.abs(want).max() > 1.0  # big enough that a wrong mapping is far beyond 1e-4

  assert cli.main(['convert', f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}']) == 0
  m = json.loads((tmp_path / 'w' / 'config.json').read_text())['model']
  assert (m['qkv_bias'], m['qk_norm'], m['rope_scaling'], m['tie_embeddings'],
          m['sliding_window']) == {
      'llama3': (False, False, 'llama3', True, 0), 'qwen2': (True, False, '', False, 0),
      'qwen3': (False, True, '', False, 0), 'mistral': (False, False, '', False, 5)}[kind]
  got = _jax_logits(convert.load(str(tmp_path / 'w')))  # replicated (pure data parallel)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # The same params sharded over 8 devices, heads and vocab split by tensor=2.
  got8 = _jax_logits(convert.load(str(tmp_path / 'w'),
                                  mesh_overrides={'data': 2, 'fsdp': 2, 'tensor': 2}))
  np.testing.assert_allclose(got8, want, atol=1e-4, rtol=0)

  assert cli.main(['convert', f'--to_hf={tmp_path / "out"}', f'--workdir={tmp_path / "w"}']) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  assert type(back).__name__ == type(hf_model).__name__
  np.testing.assert_allclose(_hf_logits(back), want, atol=1e-4, rtol=0)


def test_unsupported_settings_are_named():
  with pytest.raises(ConfigError, match="rope scaling 'yarn'"):
    hf.model_fields(dict(model_type='llama', **_LLAMA, rope_parameters={'rope_type': 'yarn'}))
  with pytest.raises(ConfigError, match='Qwen3 attention_bias'):
    hf.model_fields(dict(model_type='qwen3', **_LLAMA, attention_bias=True))
  with pytest.raises(ConfigError, match="model_type 'bert'"):
    hf.model_fields({'model_type': 'bert'})


# MoE families: (config class, model class, config kwargs, expected jaxlm moe fields).
MOE_FAMILIES = {
    'mixtral': ('MixtralConfig', 'MixtralForCausalLM', dict(
        _LLAMA, hidden_size=40, intermediate_size=24, num_key_value_heads=1,
        num_local_experts=6, num_experts_per_tok=2, rope_theta=1e4), (6, 2, 24, True)),
    # Qwen3-MoE: q/k norms, experts narrower than the (unused) dense width, raw top-k weights.
    'qwen3_moe': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM', dict(
        _LLAMA, head_dim=16, intermediate_size=64, moe_intermediate_size=20, num_experts=5,
        num_experts_per_tok=3, norm_topk_prob=False), (5, 3, 20, False)),
}


@pytest.mark.parametrize('kind', sorted(MOE_FAMILIES))
def test_moe_family_imports_and_exports_with_transformers_logits(kind, tmp_path):
  torch.manual_seed(0)
  cfg_cls, model_cls, kw, fields = MOE_FAMILIES[kind]
  hf_model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw))
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      if 'norm' in name:
        p.add_(0.3 * torch.randn_like(p))
  hf_model.eval().save_pretrained(str(tmp_path / 'hf'))
  want = _hf_logits(hf_model)
  assert np.abs(want).max() > 1.0

  assert cli.main(['convert', f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}']) == 0
  m = json.loads((tmp_path / 'w' / 'config.json').read_text())['model']
  assert (m['moe_experts'], m['moe_top_k'], m['moe_mlp_dim'] or m['mlp_dim'],
          m['moe_renormalize']) == fields
  loaded = convert.load(str(tmp_path / 'w'))
  np.testing.assert_allclose(_jax_logits(loaded), want, atol=1e-4, rtol=0)
  # transformers 5 holds experts fused in memory (gate_up_proj); that layout imports too.
  fused = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  assert any('gate_up_proj' in k for k in fused)
  params = hf.to_params(fused, loaded.cfg.model)
  got = loaded.setup.model.apply({'params': params}, TOKENS)
  np.testing.assert_allclose(np.asarray(got)[..., :300], want, atol=1e-4, rtol=0)

  assert cli.main(['convert', f'--to_hf={tmp_path / "out"}', f'--workdir={tmp_path / "w"}']) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  assert type(back).__name__ == model_cls
  assert back.config.num_experts_per_tok == fields[1]
  np.testing.assert_allclose(_hf_logits(back), want, atol=1e-4, rtol=0)
