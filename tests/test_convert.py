"""jaxlm.cli.convert / jaxlm.hf.weights: HF GPT-2 and Llama import and export match transformers' logits."""

import json

import numpy as np
import pytest

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')

from jaxlm.cli import main as cli, convert  # noqa: E402
from jaxlm.engine import build as engine  # noqa: E402
from jaxlm.hf import weights as hf  # noqa: E402

TOKENS = np.array([[5, 17, 250, 3, 99, 42, 7, 0, 299, 12, 64, 1],
                   [8, 8, 8, 200, 100, 50, 25, 12, 6, 3, 1, 0]], np.int32)


def _tiny_hf(kind: str, path):
  torch.manual_seed(0)
  if kind.startswith('gpt2'):  # gpt2: HF's default tanh GELU ('gelu_new'); gpt2_exact: erf
    c = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=300, n_positions=64,
                                activation_function='gelu' if kind == 'gpt2_exact' else 'gelu_new')
    model = transformers.GPT2LMHeadModel(c)
  else:
    c = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                 max_position_embeddings=64, rope_theta=10000.0)
    model = transformers.LlamaForCausalLM(c)
  with torch.no_grad():  # random norms and biases, so a dropped or swapped one shows up
    for name, p in model.named_parameters():
      if 'norm' in name or 'ln_' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
      if 'mlp.c_fc.weight' in name:  # GELU inputs of order 1, where tanh and erf GELU differ
        p.mul_(50.0)
  model.eval().save_pretrained(str(path))
  return model


def _hf_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()


def _jax_logits(loaded, vocab: int = 300) -> np.ndarray:
  """The HF vocabulary's logits; the padding rows' must be masked (never predicted)."""
  logits = np.asarray(loaded.setup.model.apply({'params': loaded.params}, TOKENS))
  assert (logits[..., vocab:] < -1e29).all()
  return logits[..., :vocab]


@pytest.mark.parametrize('kind', ['gpt2', 'gpt2_exact', 'llama'])
def test_import_matches_transformers_and_export_round_trips(kind, tmp_path):
  hf_model = _tiny_hf(kind, tmp_path / 'hf')
  want = _hf_logits(hf_model)

  assert cli.main(['convert', f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}']) == 0
  saved = json.loads((tmp_path / 'w' / 'config.json').read_text())
  assert (saved['model']['vocab_size'], saved['model']['vocab_used']) == (384, 300)
  if kind == 'llama':
    assert (saved['model']['n_kv_heads'], saved['model']['position']) == (2, 'rope')
    assert not saved['model']['tie_embeddings']
  loaded = engine.load(str(tmp_path / 'w'))
  got = _jax_logits(loaded)
  # The README's figure is 1.5e-7 (fp32); logits have std ~0.1, so 1e-6 catches a wrong
  # norm epsilon (1e-6 for 1e-5 moves them ~8e-5) that a looser bound would let through.
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)

  assert cli.main(['convert', f'--to_hf={tmp_path / "out"}', f'--workdir={tmp_path / "w"}']) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  assert type(back).__name__ == type(hf_model).__name__
  # "Round-trips exactly": every tensor, bit for bit, and the config fields the model reads.
  original, exported = hf.read_dir(str(tmp_path / 'hf')), hf.read_dir(str(tmp_path / 'out'))
  assert exported[1].keys() == original[1].keys()
  for name, tensor in original[1].items():
    np.testing.assert_array_equal(exported[1][name], tensor, err_msg=name)
  for key in ('layer_norm_epsilon', 'rms_norm_eps', 'num_key_value_heads', 'tie_word_embeddings',
              'rope_parameters', 'rope_theta', 'activation_function'):
    assert getattr(back.config, key, None) == getattr(hf_model.config, key, None), key
  np.testing.assert_array_equal(_hf_logits(back), want)


def test_export_cuts_padded_vocab_and_unscanned_layers(tmp_path):
  """A jaxlm-trained GPT-2 (vocab padded to 320, scan off) exports with --vocab_size."""
  _tiny_hf('gpt2', tmp_path / 'hf')
  loaded = engine.load(str(tmp_path / 'hf'))  # an HF dir loads directly too
  import jax  # noqa: PLC0415
  m = loaded.cfg.model
  with loaded.cfg.unlocked():
    m.scan_layers = False
  params = hf.to_params(hf.read_dir(str(tmp_path / 'hf'))[1], m)
  assert 'layer_1' in params and 'layers' not in params
  assert params['embed']['embedding'].shape == (384, 32)  # padded to a multiple of 128
  padded = dict(params, embed={'embedding': np.pad(params['embed']['embedding'], ((0, 20), (0, 0)))})
  tensors = hf.from_params(jax.tree.map(np.asarray, padded), m, vocab_size=300)
  assert tensors['transformer.wte.weight'].shape == (300, 32)
  np.testing.assert_array_equal(tensors['transformer.h.1.attn.c_attn.weight'],
                                hf.read_dir(str(tmp_path / 'hf'))[1]['transformer.h.1.attn.c_attn.weight'])


def test_convert_errors_are_one_line(tmp_path, capsys):
  assert cli.main(['convert', f'--from_hf={tmp_path}', f'--workdir={tmp_path / "w"}']) == 2
  assert 'has no config.json' in capsys.readouterr().err
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
  assert cli.main(['convert', f'--from_hf={tmp_path}', f'--workdir={tmp_path / "w"}']) == 2
  assert "model_type 'bert' is not supported" in capsys.readouterr().err
  assert cli.main(['convert', f'--workdir={tmp_path / "w"}']) == 2


def _odd_vocab_llama(path, vocab=101):
  torch.manual_seed(0)
  c = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                               max_position_embeddings=32)
  transformers.LlamaForCausalLM(c).eval().save_pretrained(str(path))


def test_odd_vocab_pads_runs_on_any_mesh_and_names_indivisible_shapes(tmp_path, monkeypatch):
  """A 101-token vocabulary is padded to 128 rows: it imports, trains-shaped meshes load it,
  and export gives the 101 rows back. Unpadded, the restore names the shape and mesh axis."""
  from jaxlm.core.errors import ConfigError  # noqa: PLC0415
  from jaxlm.hf import weights as hf  # noqa: PLC0415
  _odd_vocab_llama(tmp_path / 'hf')
  tokens = TOKENS % 101
  assert cli.main(['convert', f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}']) == 0
  want = None
  for mesh in ({'data': 1, 'fsdp': 8}, {'fsdp': 4, 'tensor': 2, 'data': 1},
               {'data': 2, 'fsdp': 2, 'tensor': 2}):
    loaded = engine.load(str(tmp_path / 'w'), mesh_overrides=mesh)
    logits = np.asarray(loaded.setup.model.apply({'params': loaded.params}, tokens))
    assert logits.shape[-1] == 128 and (logits[..., 101:] < -1e29).all()
    want = logits if want is None else want
    np.testing.assert_allclose(logits, want, atol=1e-5)
  assert cli.main(['convert', f'--to_hf={tmp_path / "out"}', f'--workdir={tmp_path / "w"}']) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out'))
  assert back.config.vocab_size == 101

  monkeypatch.setattr(hf, 'VOCAB_MULTIPLE', 1)  # as before padding: a 101-row embedding
  assert cli.main(['convert', f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w1"}']) == 0
  with pytest.raises(ConfigError) as e:
    engine.load(str(tmp_path / 'w1'), mesh_overrides={'fsdp': 4, 'tensor': 2, 'data': 1})
  assert 'parameter params/embed/embedding of shape (101, 48): dimension 0 (101) does not ' \
         'divide over mesh.tensor=2' in str(e.value)
  assert 'corrupt' not in str(e.value)


def test_import_writes_params_only_bf16_stays_bf16_and_training_adds_optimizer(tmp_path, tiny_cfg,
                                                                              monkeypatch):
  """Import streams one tensor at a time into a params-only step 0 (no optimizer state);
  bf16 weights stay bf16 bit for bit; `train` on the workdir creates the optimizer state.
  The workdir is given relative (Orbax itself refuses relative paths)."""
  import ml_dtypes  # noqa: PLC0415
  from jaxlm.checkpoint.checkpointer import Checkpointer  # noqa: PLC0415
  from jaxlm.core import config as config_lib  # noqa: PLC0415
  from jaxlm.run.loop import Trainer  # noqa: PLC0415
  model = _tiny_hf('llama', tmp_path / 'f32')
  model.to(torch.bfloat16).save_pretrained(str(tmp_path / 'hf'))
  monkeypatch.chdir(tmp_path)
  assert cli.main(['convert', f'--from_hf={tmp_path / "hf"}', '--workdir=w',
                   '--param_dtype=bfloat16']) == 0
  cfg = config_lib.load_saved(str(tmp_path / 'w'))
  assert cfg.model.param_dtype == 'bfloat16'
  with Checkpointer(str(tmp_path / 'w'), cfg.checkpoint, read_only=True) as ckpt:
    assert ckpt.steps() == [0] and ckpt.holds_params_only(0)
  loaded = engine.load(str(tmp_path / 'w'))
  emb = np.asarray(loaded.params['embed']['embedding'])
  assert emb.dtype == ml_dtypes.bfloat16
  want = model.model.embed_tokens.weight.detach().float().numpy().astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(emb[:300].view(np.uint16), want.view(np.uint16))

  with cfg.unlocked():
    cfg.data.path, cfg.train.steps = tiny_cfg.data.path, 2
    cfg.checkpoint.every, cfg.eval.every, cfg.train.progress = 0, 0, False
  Trainer(cfg, str(tmp_path / 'w')).run()
  with Checkpointer(str(tmp_path / 'w'), cfg.checkpoint, read_only=True) as ckpt:
    assert ckpt.latest_step() == 2 and not ckpt.holds_params_only(2)


def test_export_writes_sharded_files_with_an_index_transformers_loads(tmp_path):
  """Past --max_shard_size the export writes model-0000i-of-0000N.safetensors and an index,
  as save_pretrained does; transformers loads them with the original's logits."""
  hf_model = _tiny_hf('llama', tmp_path / 'hf')
  assert cli.main(['convert', f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}']) == 0
  out = tmp_path / 'out'
  (out).mkdir()
  (out / 'model.safetensors').write_bytes(b'stale')  # a previous export's file goes away
  assert cli.main(['convert', f'--to_hf={out}', f'--workdir={tmp_path / "w"}',
                   '--max_shard_size=30KB']) == 0
  files = sorted(p.name for p in out.glob('*.safetensors'))
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  assert len(files) > 2 and files[0] == f'model-00001-of-{len(files):05d}.safetensors', files
  assert sorted(set(index['weight_map'].values())) == files
  sizes = [(out / f).stat().st_size for f in files]
  assert max(sizes) < 30_000 + 40_000  # one 300x32 fp32 tensor alone passes the limit
  original = hf.read_dir(str(tmp_path / 'hf'))[1]
  assert index['weight_map'].keys() == original.keys()
  assert index['metadata']['total_size'] == sum(t.size * 4 for t in original.values())
  back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  np.testing.assert_array_equal(_hf_logits(back), _hf_logits(hf_model))


def test_export_on_two_processes_writes_from_process_0_only(repo, tmp_path):
  """Two jax.distributed processes (gloo on 127.0.0.1) export one workdir to the relative
  path out/, each from its own directory: only process 0's directory gets files."""
  import os  # noqa: PLC0415
  import socket  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  hf_model = _tiny_hf('llama', tmp_path / 'hf')
  assert cli.main(['convert', f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}']) == 0
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    cwd = tmp_path / f'p{i}'
    cwd.mkdir()
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(repo),
           'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
           'JAXLM_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAXLM_NUM_PROCESSES': '2',
           'JAXLM_PROCESS_ID': str(i)}
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'jaxlm', 'convert', f'--workdir={tmp_path / "w"}', '--to_hf=out'],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert 'process 0/2: 2 local devices, 4 global' in outs[0]
  assert not (tmp_path / 'p1' / 'out').exists(), outs[1]
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'p0' / 'out')).eval()
  np.testing.assert_array_equal(_hf_logits(back), _hf_logits(hf_model))


def test_interrupted_import_leaves_no_step_and_a_rerun_completes(tmp_path, monkeypatch):
  """The step is built aside and renamed when every parameter is in: an import stopped
  half-way leaves no checkpoints/ (nothing to resume from zeros), and a rerun succeeds."""
  from jaxlm.checkpoint import param_store  # noqa: PLC0415
  from jaxlm.core.errors import StorageError  # noqa: PLC0415
  _tiny_hf('llama', tmp_path / 'hf')
  fill, calls = param_store.fill, []

  def fail_third(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise StorageError('disk full (simulated)')
    return fill(*args, **kwargs)

  monkeypatch.setattr(param_store, 'fill', fail_third)
  argv = ['convert', f'--from_hf={tmp_path / "hf"}', f'--workdir={tmp_path / "w"}']
  assert cli.main(argv) != 0
  assert not (tmp_path / 'w' / 'checkpoints').exists()
  monkeypatch.setattr(param_store, 'fill', fill)
  assert cli.main(argv) == 0
  assert not (tmp_path / 'w' / 'checkpoints.importing').exists()
  assert engine.load(str(tmp_path / 'w')).step == 0
