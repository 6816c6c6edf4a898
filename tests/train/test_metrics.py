"""FLOP accounting and peak FLOP/s: jaxlm.run.metrics against hand counts and the table."""

import json
import types

import jax
import pytest

from jaxlm.core.mesh import make_mesh
from jaxlm.engine.build import Setup
from jaxlm.model.transformer import build_model, param_count
from jaxlm.run import metrics
from tests.conftest import load_config


def _small_cfg(**model):
  """GPT-2 style: d 64, 2 layers, 4 heads, MLP 256, vocab 128, seq 32, no biases."""
  cfg = load_config('base')
  m = cfg.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 128, 64, 2, 4, 4
  m.mlp_dim, m.max_seq_len, m.use_bias, m.scan_layers = 256, 32, False, False
  for k, v in model.items():
    m[k] = v
  cfg.data.seq_len = 32
  cfg.train.batch_size = 8
  return cfg


def _model_params(cfg) -> int:
  return Setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1])).n_params


def test_flops_per_token_matches_hand_count_gpt2_tied():
  cfg = _small_cfg()
  d, layers, mlp, vocab, seq = 64, 2, 256, 128, 32
  # Per layer: q, k, v, out (4 d^2), MLP up and down (2 d mlp), two norm scales (2 d).
  per_layer = 4 * d * d + 2 * d * mlp + 2 * d
  total = layers * per_layer + vocab * d + seq * d + d  # + embedding, positions, final norm
  assert _model_params(cfg) == total
  # Matmul params: the position table is a gather (no FLOPs); the tied embedding is the head.
  n = metrics.matmul_params(cfg.model, total)
  assert n == total - seq * d
  expected = 6 * n + 12 * layers * d * seq
  assert metrics.flops_per_token(cfg.model, n, seq) == expected


def test_flops_per_token_untied_rope_gqa():
  cfg = _small_cfg(tie_embeddings=False, position='rope', n_kv_heads=2, head_dim=8,
                   activation='swiglu', norm='rmsnorm')
  d, layers, mlp, vocab, seq, heads, kv, hd = 64, 2, 256, 128, 32, 4, 2, 8
  per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * mlp + 2 * d  # q,out; k,v; SwiGLU
  total = layers * per_layer + 2 * vocab * d + d  # embedding + untied head, final norm
  assert _model_params(cfg) == total
  n = metrics.matmul_params(cfg.model, total)
  assert n == total - vocab * d  # the input embedding is a gather
  # Attention FLOPs scale with the query width heads * head_dim, not d_model.
  assert metrics.flops_per_token(cfg.model, n, seq) == 6 * n + 12 * layers * heads * hd * seq


def test_flops_per_token_sliding_window_counts_only_the_window():
  cfg = _small_cfg(position='rope', sliding_window=8)
  n = metrics.matmul_params(cfg.model, _model_params(cfg))
  assert metrics.flops_per_token(cfg.model, n, 32) == 6 * n + 12 * 2 * 64 * 8
  assert metrics.flops_per_token(cfg.model, n, 4) == 6 * n + 12 * 2 * 64 * 4  # window > seq


def test_param_count_matches_model_init():
  cfg = _small_cfg()
  params = build_model(cfg.model).init(jax.random.key(0), jax.numpy.zeros((1, 32), 'int32'))
  assert param_count(params['params']) == _model_params(cfg)


@pytest.mark.parametrize('kind, peak', [
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA A100-SXM4-40GB', 312e12),
    ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5p', 459e12), ('TPU v6 lite', 918e12),
])
def test_device_peak_flops_uses_the_table(monkeypatch, kind, peak):
  monkeypatch.setattr(metrics.jax, 'devices', lambda: [types.SimpleNamespace(device_kind=kind)])
  assert metrics.device_peak_flops() == peak


def test_device_peak_flops_override_wins(monkeypatch):
  monkeypatch.setattr(metrics.jax, 'devices',
                      lambda: [types.SimpleNamespace(device_kind='NVIDIA H100')])
  assert metrics.device_peak_flops(123.0) == 123.0


def test_device_peak_flops_measures_cpu(monkeypatch):
  monkeypatch.setattr(metrics, '_CPU_PEAK_CACHE', {})
  assert jax.devices()[0].platform == 'cpu'
  peak = metrics.device_peak_flops()
  assert peak > 0
  assert metrics.device_peak_flops() == peak  # cached: measured once per process


def test_non_finite_metrics_are_null_in_jsonl_and_absent_from_tensorboard(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  scalars = []
  writer._tb.add_scalar = lambda k, v, step: scalars.append((k, v))
  writer.write(3, {'train/loss': float('nan'), 'train/grad_norm': float('inf'), 'train/lr': 0.5})
  writer.close()

  def refuse(name):
    raise ValueError(name)
  row = json.loads((tmp_path / 'metrics.jsonl').read_text(), parse_constant=refuse)
  assert row == {'step': 3, 'train/loss': None, 'train/grad_norm': None, 'train/lr': 0.5}
  assert scalars == [('train/lr', 0.5)]
