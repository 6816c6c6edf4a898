"""HF import of freshly initialized models (zero biases, unit norms) and of constant tensors.

A model straight from ``Model(Config(...))`` has tensors that equal the store's fill value
(0) in full; an import that skips storing those chunks writes a checkpoint Orbax cannot
read. The tests in test_hf.py / test_convert.py randomize every norm and bias, so they
never meet that case; these do, for every family jaxlm converts, in fp32 and bf16.
"""

import numpy as np
import pytest

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')

from jaxlm.checkpoint import param_store  # noqa: E402
from jaxlm.cli import main as cli, convert  # noqa: E402
from jaxlm.engine import build as engine  # noqa: E402
from jaxlm.hf import weights as hf  # noqa: E402

TOKENS = np.array([[5, 17, 250, 3, 99, 42, 7, 0, 299, 12, 64, 1, 77],
                   [8, 8, 8, 200, 100, 50, 25, 12, 6, 3, 1, 0, 5]], np.int32)
_LLAMA = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=32)

# Every model_type jaxlm imports (hf.IMPORTERS), at HF's own initialization.
FRESH = {
    'gpt2': ('GPT2Config', 'GPT2LMHeadModel', dict(n_layer=2, n_embd=24, n_head=3,
                                                   vocab_size=300, n_positions=32)),
    'llama': ('LlamaConfig', 'LlamaForCausalLM', _LLAMA),
    'mistral': ('MistralConfig', 'MistralForCausalLM', dict(_LLAMA, sliding_window=4)),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', dict(_LLAMA, num_key_value_heads=1)),
    'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM', dict(_LLAMA, head_dim=8)),
    'mixtral': ('MixtralConfig', 'MixtralForCausalLM', dict(
        _LLAMA, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    'qwen3_moe': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM', dict(
        _LLAMA, head_dim=8, moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2)),
}


def test_every_imported_family_is_covered():
  assert set(FRESH) == set(hf.IMPORTERS)


def _fresh(kind: str, path, dtype=torch.float32, **extra):
  torch.manual_seed(1)
  cfg_cls, model_cls, kw = FRESH[kind]
  model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**dict(kw, **extra)))
  model = model.to(dtype).eval()
  model.save_pretrained(str(path))
  return model


def _hf_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _jax_logits(loaded) -> np.ndarray:
  return np.asarray(loaded.setup.model.apply({'params': loaded.params}, TOKENS),
                    np.float32)[..., :300]


def _import(hf_dir, workdir, *flags) -> None:
  assert cli.main(['convert', f'--from_hf={hf_dir}', f'--workdir={workdir}', *flags]) == 0


@pytest.mark.parametrize('kind', sorted(FRESH))
def test_fresh_model_imports_reads_back_and_matches_transformers(kind, tmp_path):
  """Freshly initialized (biases all 0, norms all 1): the step restores and gives
  transformers' logits; scaled up so that 1e-4 is far below a wrong mapping."""
  model = _fresh(kind, tmp_path / 'hf', initializer_range=0.3)
  zeros = [n for n, p in model.named_parameters() if not p.detach().abs().max()]
  ones = [n for n, p in model.named_parameters() if bool((p.detach() == 1).all())]
  assert ones and (zeros or kind not in ('gpt2', 'qwen2')), (zeros, ones)
  _import(tmp_path / 'hf', tmp_path / 'w')
  want = _hf_logits(model)
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(_jax_logits(engine.load(str(tmp_path / 'w'))), want, atol=1e-4,
                             rtol=0)


@pytest.mark.parametrize('kind', ['gpt2', 'qwen2', 'qwen3_moe'])
def test_fresh_bf16_model_imports_bit_for_bit(kind, tmp_path):
  """bf16 weights imported as bf16: every parameter restored equals the HF tensors exactly."""
  _fresh(kind, tmp_path / 'hf', dtype=torch.bfloat16)
  _import(tmp_path / 'hf', tmp_path / 'w', '--param_dtype=bfloat16')
  loaded = engine.load(str(tmp_path / 'w'))
  _, tensors = hf.read_dir(str(tmp_path / 'hf'))
  want = hf.to_params(tensors, loaded.cfg.model)
  got = {k: np.asarray(v) for k, v in _flat(loaded.params).items()}
  for name, w in _flat(want).items():
    assert got[name].dtype == w.dtype, name
    np.testing.assert_array_equal(got[name].view(np.uint16), w.view(np.uint16), err_msg=name)


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}/'))
    else:
      out[prefix + k] = v
  return out


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('value', [0.0, 1.0])
def test_constant_tensors_import_exactly(value, dtype, tmp_path):
  """Whole tensors equal to 0 (the store's fill value) or 1, as well as the embedding and
  an attention kernel, in fp32 and bf16: each restores with exactly its value."""
  model = _fresh('llama', tmp_path / 'src', dtype=dtype)
  with torch.no_grad():
    model.model.layers[0].self_attn.q_proj.weight.fill_(value)
    model.model.layers[1].mlp.down_proj.weight.fill_(value)
    model.model.embed_tokens.weight.fill_(value)
  model.save_pretrained(str(tmp_path / 'hf'))
  flags = ['--param_dtype=bfloat16'] if dtype == torch.bfloat16 else []
  _import(tmp_path / 'hf', tmp_path / 'w', *flags)
  p = engine.load(str(tmp_path / 'w')).params
  for x in (p['embed']['embedding'][:300], p['layers']['attn']['query']['kernel'][0],
            p['layers']['mlp']['down']['kernel'][1]):
    assert (np.asarray(x, np.float32) == value).all()
  np.testing.assert_allclose(_jax_logits(engine.load(str(tmp_path / 'w'))), _hf_logits(model),
                             atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=0)


def test_fresh_gpt2_workdir_generates_evaluates_and_trains(tmp_path, tiny_cfg, capsys):
  """The report's case end to end: a fresh GPT-2 import, then generate, eval and train."""
  _fresh('gpt2', tmp_path / 'hf', n_positions=64)
  w = tmp_path / 'w'
  _import(tmp_path / 'hf', w, f'--data_path={tiny_cfg.data.path}')
  base = [f'--workdir={w}']
  assert cli.main(['generate', *base, '--prompt=ab', '--max_new_tokens=5']) == 0
  assert cli.main(['eval', *base]) == 0
  from jaxlm.core import config as config_lib  # noqa: PLC0415
  from jaxlm.run.loop import Trainer  # noqa: PLC0415
  cfg = config_lib.load_saved(str(w))
  with cfg.unlocked():
    cfg.train.steps = 2
    cfg.checkpoint.every, cfg.eval.every, cfg.train.progress = 0, 0, False
  assert Trainer(cfg, str(w)).run()['step'] == 2
  assert engine.load(str(w)).step == 2


def test_verify_reads_every_block_back(tmp_path):
  """param_store.verify: a fill-valued block must be stored (Orbax reads a missing chunk
  as an error) and every value must match; both failures are reported, not passed."""
  import jax.numpy as jnp  # noqa: PLC0415
  import tensorstore as ts  # noqa: PLC0415
  step = str(tmp_path / 'step')
  shapes = {('a',): (6, 5), ('b',): (5,)}
  param_store.save_empty(step, shapes, jnp.float32)
  zeros, ones = np.zeros((6, 5), np.float32), np.ones((5,), np.float32)

  def opened(path, **kw):
    return param_store.open_param(step, path, ts.Context(), **kw)

  # Written without storing fill-valued chunks: the zeros are missing from storage.
  param_store.fill(opened(('a',)), zeros)
  assert 'cannot be read back' in param_store.verify(opened(('a',), strict=True), zeros)
  param_store.fill(opened(('a',), write=True), zeros)
  assert param_store.verify(opened(('a',), strict=True), zeros) is None
  param_store.fill(opened(('b',), write=True), ones)
  assert param_store.verify(opened(('b',), strict=True), ones) is None
  assert 'different values' in param_store.verify(opened(('b',), strict=True), ones * 2)


def test_import_refuses_when_a_parameter_does_not_read_back(tmp_path, monkeypatch, capsys):
  """A write that storage lost (simulated by a fill that skips one block): one error line,
  no step renamed into place."""
  _fresh('llama', tmp_path / 'hf')
  fill = param_store.fill

  def lossy(array, leaf, after_block=None):
    fill(array, leaf, after_block)
    if tuple(array.shape) == (24,):  # a norm scale: write zeros over its ones
      array.write(np.zeros((24,), array.dtype.numpy_dtype)).result()

  monkeypatch.setattr(param_store, 'fill', lossy)
  capsys.readouterr()
  assert cli.main(['convert', f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'reads back different values' in err[0], err
  assert not (tmp_path / 'w').exists()  # the refused import left nothing behind
  monkeypatch.setattr(param_store, 'fill', fill)
  assert cli.main(['convert', f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}']) == 0
  assert convert.load(str(tmp_path / 'w')).step == 0


def test_import_copies_the_models_tokenizer_into_the_workdir(tmp_path, tiny_cfg):
  """The HF directory's tokenizer.json becomes the workdir's own (sha256 recorded), so
  generate still works once the HF directory is gone."""
  import hashlib  # noqa: PLC0415
  import json  # noqa: PLC0415
  import shutil  # noqa: PLC0415
  from jaxlm.data import tokenizer_train  # noqa: PLC0415
  _fresh('gpt2', tmp_path / 'hf')
  tokenizer_train.train([open(tiny_cfg.data.path).read()[:20_000]], 'bpe', 300, tmp_path / 'hf')
  _import(tmp_path / 'hf', tmp_path / 'w')
  shutil.rmtree(tmp_path / 'hf')
  d = json.loads((tmp_path / 'w' / 'config.json').read_text())['data']
  copy = tmp_path / 'w' / 'tokenizer' / 'tokenizer.json'
  assert (d['tokenizer'], d['tokenizer_path'], d['tokenizer_vocab']) == ('hf', str(copy), 300)
  assert d['tokenizer_sha256'] == hashlib.sha256(copy.read_bytes()).hexdigest()
  assert cli.main(['generate', f'--workdir={tmp_path / "w"}', '--prompt=The',
                   '--max_new_tokens=3']) == 0
