"""Hugging Face <-> jaxlm: config fields and parameter names, GPT-2 and Llama families.

Pure numpy, no torch: ``read_dir`` loads a local HF directory (config.json +
safetensors, sharded or not); ``model_fields`` turns its config into jaxlm
``model`` fields; ``to_params`` / ``from_params`` map tensors both ways.

Layouts worth knowing:
  GPT-2 Conv1D weights are ``[in, out]`` and ``c_attn`` packs q, k, v along
  ``out``; Llama ``nn.Linear`` weights are ``[out, in]``. jaxlm kernels are
  ``[in..., out...]`` with heads split out (``query/kernel [embed, heads,
  head_dim]``, ``out/kernel [heads, head_dim, embed]``). jaxlm RoPE uses the
  half-split layout of HF Llama, so q/k need no permutation.
"""

import json
import mmap
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxlm.core import storage
from jaxlm.core.errors import CheckpointError, ConfigError

_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


# ---- reading and writing HF directories -------------------------------------------------

def read_dir(path: str) -> tuple[dict, 'SafetensorsDir']:
  """(config.json as a dict, lazy {tensor name: array}) from a local HF model directory."""
  d = Path(path)
  if not (d / 'config.json').is_file():
    raise ConfigError(f"--from_hf '{path}' has no config.json (is it a Hugging Face model dir?)")
  hf = json.loads((d / 'config.json').read_text())
  family(hf)  # an unsupported architecture is named before any weights are read
  index = d / 'model.safetensors.index.json'
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
  elif (d / 'model.safetensors').is_file():
    files = ['model.safetensors']
  else:
    raise CheckpointError(f"'{path}' has no model.safetensors (a pytorch_model.bin must first be "
                          'resaved with save_pretrained(..., safe_serialization=True))')
  return hf, SafetensorsDir([d / f for f in files])


def _dtypes() -> dict:
  import ml_dtypes  # noqa: PLC0415  (ships with jax; numpy has no bfloat16)
  return {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}


class SafetensorsDir(Mapping):
  """Tensors of safetensors files by name, read lazily from read-only memory maps.

  A lookup is a view into its file's map (nothing is read until used; the
  dtype is the file's, bf16 included), so the tensor-name mapping below can
  reshape and transpose without copying. ``release()`` drops the pages read
  so far from this process (madvise DONTNEED; views stay valid and read them
  again from the page cache), so they stop counting toward its memory.
  """

  def __init__(self, files):
    self._index, self._maps, self._mmaps = {}, {}, []
    dtypes = _dtypes()
    for f in files:  # the format: u64 header size, JSON header, raw little-endian bytes
      with open(f, 'rb') as fh:
        n = int(np.frombuffer(fh.read(8), np.uint64)[0])
        header = json.loads(fh.read(n))
      for name, info in header.items():
        if name != '__metadata__':
          start, end = info['data_offsets']
          self._index[name] = (str(f), dtypes[info['dtype']], tuple(info['shape']),
                               8 + n + start, 8 + n + end)

  def __getitem__(self, name: str) -> np.ndarray:
    f, dtype, shape, start, end = self._index[name]
    if f not in self._maps:
      with open(f, 'rb') as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
      self._mmaps.append(mm)
      self._maps[f] = np.frombuffer(mm, np.uint8)
    return self._maps[f][start:end].view(dtype).reshape(shape)

  def __iter__(self):
    return iter(self._index)

  def __len__(self) -> int:
    return len(self._index)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._index[name][2]

  def release(self) -> None:
    for mm in self._mmaps:
      mm.madvise(mmap.MADV_DONTNEED)


def write_dir(path: str, hf_config: dict, tensors: dict[str, np.ndarray]) -> None:
  """Writes config.json and one model.safetensors that transformers' from_pretrained reads.

  ``path`` may be local or a gs:// / s3:// URI (jaxlm.core.storage).
  """
  from safetensors.numpy import save  # noqa: PLC0415
  d = storage.path(path)
  d.mkdir(parents=True, exist_ok=True)
  (d / 'config.json').write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  (d / 'model.safetensors').write_bytes(
      save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={'format': 'pt'}))


# ---- config: one function per family each way -----------------------------------------
# Every family is a setting of the one jaxlm Transformer. Import: ``<family>_fields(hf)`` ->
# jaxlm ``model`` fields. Export: ``<family>_config(m, common)`` -> config.json dict.


def family(hf: dict) -> str:
  """The HF ``model_type`` if jaxlm imports it; ConfigError naming the supported ones."""
  t = hf.get('model_type', '')
  if t not in IMPORTERS:
    raise ConfigError(f"Hugging Face model_type '{t}' is not supported "
                      f"(supported: {', '.join(IMPORTERS)})")
  return t


def _rope_fields(hf: dict) -> dict:
  """RoPE base and scaling; transformers 5 writes rope_parameters, 4 rope_theta/rope_scaling."""
  rp = dict(hf.get('rope_scaling') or {}, **(hf.get('rope_parameters') or {}))
  kind = rp.get('rope_type') or rp.get('type') or 'default'
  out = dict(rope_theta=float(rp.get('rope_theta', hf.get('rope_theta', 10000.0))))
  if kind == 'llama3':
    out.update(rope_scaling='llama3', rope_factor=float(rp['factor']),
               rope_low_freq_factor=float(rp['low_freq_factor']),
               rope_high_freq_factor=float(rp['high_freq_factor']),
               rope_original_max_len=int(rp['original_max_position_embeddings']))
  elif kind != 'default':
    raise ConfigError(f"rope scaling '{kind}' is not supported by jaxlm's RoPE "
                      "(supported: default, llama3)")
  return out


def gpt2_fields(hf: dict) -> dict:
  act = hf.get('activation_function', 'gelu_new')
  if act not in (*_TANH_GELUS, 'gelu'):
    raise ConfigError(f"GPT-2 activation_function '{act}' is not supported "
                      f"(supported: gelu, {', '.join(_TANH_GELUS)})")
  if hf.get('scale_attn_by_inverse_layer_idx') or not hf.get('scale_attn_weights', True):
    raise ConfigError('GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported')
  d = hf['n_embd']
  return dict(vocab_size=hf['vocab_size'], d_model=d, n_layers=hf['n_layer'],
              n_heads=hf['n_head'], n_kv_heads=hf['n_head'], head_dim=0,
              mlp_dim=hf.get('n_inner') or 4 * d, max_seq_len=hf['n_positions'],
              norm='layernorm', norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
              activation='gelu_exact' if act == 'gelu' else 'gelu', position='learned',
              use_bias=True,
              tie_embeddings=bool(hf.get('tie_word_embeddings', True)))


def llama_fields(hf: dict) -> dict:
  """Llama 2/3/3.1/3.2: RoPE (+ llama3 scaling), RMSNorm, SwiGLU, GQA, optional tied head."""
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ConfigError(f"{hf.get('model_type')} hidden_act '{hf['hidden_act']}' is not supported "
                      "(only 'silu')")
  d, heads = hf['hidden_size'], hf['num_attention_heads']
  hd = hf.get('head_dim') or d // heads
  return dict(vocab_size=hf['vocab_size'], d_model=d, n_layers=hf['num_hidden_layers'],
              n_heads=heads, n_kv_heads=hf.get('num_key_value_heads') or heads,
              head_dim=0 if hd == d // heads else hd, mlp_dim=hf['intermediate_size'],
              max_seq_len=hf['max_position_embeddings'], norm='rmsnorm',
              norm_eps=float(hf.get('rms_norm_eps', 1e-6)), activation='swiglu',
              position='rope', **_rope_fields(hf),
              use_bias=bool(hf.get('attention_bias') or hf.get('mlp_bias')),
              tie_embeddings=bool(hf.get('tie_word_embeddings', False)))


def _no_sliding_window(hf: dict) -> None:
  window = hf.get('sliding_window')
  uses = hf.get('use_sliding_window', hf.get('model_type') == 'mistral')
  if uses and window and window < hf.get('max_position_embeddings', 0):
    raise ConfigError(f"{hf.get('model_type')} sliding-window attention is not supported")


def mistral_fields(hf: dict) -> dict:
  """Mistral: Llama with sliding-window attention (each token sees the latest N, itself
  included: ``model.sliding_window``)."""
  window = int(hf.get('sliding_window') or 0)
  return dict(llama_fields(hf), sliding_window=window if window < hf['max_position_embeddings']
              else 0)


def qwen2_fields(hf: dict) -> dict:
  """Qwen2/2.5: Llama with a bias on the q/k/v projections only."""
  _no_sliding_window(hf)
  return dict(llama_fields(hf), use_bias=False, qkv_bias=True)


def qwen3_fields(hf: dict) -> dict:
  """Qwen3: Llama with RMSNorm on each query/key head (before RoPE)."""
  _no_sliding_window(hf)
  if hf.get('attention_bias'):
    raise ConfigError('Qwen3 attention_bias=true is not supported (jaxlm biases attention and '
                      'MLP together)')
  return dict(llama_fields(hf), use_bias=False, qk_norm=True)


def mixtral_fields(hf: dict) -> dict:
  """Mixtral: Mistral with every MLP a top-k Mixture of Experts (renormalized softmax router)."""
  _no_sliding_window(hf)
  k = int(hf.get('num_experts_per_tok', 2))
  # HF's load-balancing loss is top_k times jaxlm's (see jaxlm.model.moe.router_losses).
  return dict(llama_fields(hf), use_bias=False, moe_experts=int(hf['num_local_experts']),
              moe_top_k=k, moe_every=1, moe_shared_experts=0, moe_mlp_dim=0,
              moe_renormalize=True, moe_capacity_factor=0.0,
              moe_aux_loss_weight=float(hf.get('router_aux_loss_coef', 0.001)) * k,
              moe_z_loss_weight=0.0)


def qwen3_moe_fields(hf: dict) -> dict:
  """Qwen3-MoE: Qwen3 with every MLP a top-k Mixture of Experts (norm_topk_prob optional)."""
  if hf.get('mlp_only_layers') or int(hf.get('decoder_sparse_step', 1)) != 1:
    raise ConfigError('Qwen3-MoE with dense layers (mlp_only_layers, decoder_sparse_step > 1) '
                      'is not supported')
  k = int(hf.get('num_experts_per_tok', 8))
  experts = hf.get('num_experts') or hf['num_local_experts']  # transformers 4 / 5 spelling
  return dict(qwen3_fields(hf), moe_experts=int(experts), moe_top_k=k, moe_every=1,
              moe_shared_experts=0, moe_mlp_dim=int(hf['moe_intermediate_size']),
              moe_renormalize=bool(hf.get('norm_topk_prob', False)), moe_capacity_factor=0.0,
              moe_aux_loss_weight=float(hf.get('router_aux_loss_coef', 0.001)) * k,
              moe_z_loss_weight=0.0)


IMPORTERS = {'gpt2': gpt2_fields, 'llama': llama_fields, 'mistral': mistral_fields,
             'qwen2': qwen2_fields, 'qwen3': qwen3_fields, 'mixtral': mixtral_fields,
             'qwen3_moe': qwen3_moe_fields}


VOCAB_MULTIPLE = 128


def model_fields(hf: dict) -> dict:
  """jaxlm ``model`` fields for an HF config dict of any supported family.

  The vocabulary is padded to a multiple of 128 rows (``vocab_used`` keeps the
  real size; the model masks the padding's logits, export cuts it off), so an
  odd vocabulary such as GPT-2's 50,257 splits evenly over any mesh.
  """
  fields = IMPORTERS[family(hf)](hf)
  v = fields['vocab_size']
  return dict(fields, vocab_size=-(-v // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, vocab_used=v)


def export_family(m) -> str:
  """The HF model_type a jaxlm ``model`` section maps onto exactly, or ConfigError."""
  if (m.position, m.norm) == ('learned', 'layernorm') and m.activation in ('gelu', 'gelu_exact'):
    if m.n_kv_heads != m.n_heads or (m.head_dim and m.head_dim * m.n_heads != m.d_model):
      raise ConfigError('GPT-2 export needs n_kv_heads == n_heads and head_dim == d_model / n_heads')
    return 'gpt2'
  if (m.position, m.norm, m.activation) != ('rope', 'rmsnorm', 'swiglu'):
    raise ConfigError(f'no Hugging Face architecture matches model.position={m.position!r}, '
                      f'model.norm={m.norm!r}, model.activation={m.activation!r}')
  if m.moe_experts:
    if (m.moe_every != 1 or m.moe_shared_experts or m.use_bias or m.qkv_bias or m.rope_scaling
        or m.sliding_window or not (m.qk_norm or m.moe_renormalize)):
      raise ConfigError('MoE export (Mixtral, Qwen3-MoE) needs model.moe_every=1, '
                        'moe_shared_experts=0, no biases, rope_scaling or sliding_window, and '
                        'moe_renormalize=True unless qk_norm (Qwen3-MoE)')
    return 'qwen3_moe' if m.qk_norm else 'mixtral'
  if m.sliding_window:
    if m.use_bias or m.qk_norm or m.qkv_bias or m.rope_scaling:
      raise ConfigError('Mistral export (model.sliding_window) needs no biases, qk_norm or '
                        'rope_scaling')
    return 'mistral'
  if m.qk_norm or m.qkv_bias:
    if m.use_bias or (m.qk_norm and m.qkv_bias):
      raise ConfigError('no Hugging Face architecture matches model.qk_norm / model.qkv_bias '
                        'together with each other or with model.use_bias')
    if m.rope_scaling:
      raise ConfigError(f'Qwen export does not support model.rope_scaling={m.rope_scaling!r}')
    return 'qwen3' if m.qk_norm else 'qwen2'
  return 'llama'


def _rope_config(m) -> dict:
  rp = {'rope_theta': m.rope_theta, 'rope_type': 'default'}
  if m.rope_scaling == 'llama3':
    rp.update(rope_type='llama3', factor=m.rope_factor, low_freq_factor=m.rope_low_freq_factor,
              high_freq_factor=m.rope_high_freq_factor,
              original_max_position_embeddings=m.rope_original_max_len)
  # Both spellings: transformers 4 reads rope_theta/rope_scaling, 5 reads rope_parameters.
  out = dict(rope_theta=m.rope_theta, rope_parameters=rp)
  if m.rope_scaling:
    out['rope_scaling'] = rp
  return out


def gpt2_config(m, common: dict) -> dict:
  return dict(common, architectures=['GPT2LMHeadModel'], n_embd=m.d_model,
              n_layer=m.n_layers, n_head=m.n_heads, n_inner=m.mlp_dim,
              n_positions=m.max_seq_len, layer_norm_epsilon=m.norm_eps,
              activation_function='gelu' if m.activation == 'gelu_exact' else 'gelu_new',
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
              scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
              reorder_and_upcast_attn=False)


def llama_config(m, common: dict) -> dict:
  return dict(common, architectures=['LlamaForCausalLM'], hidden_size=m.d_model,
              intermediate_size=m.mlp_dim, num_hidden_layers=m.n_layers,
              num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
              head_dim=m.head_dim or m.d_model // m.n_heads,
              max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
              hidden_act='silu', attention_bias=bool(m.use_bias), mlp_bias=bool(m.use_bias),
              attention_dropout=0.0, **_rope_config(m))


def qwen2_config(m, common: dict) -> dict:
  out = dict(llama_config(m, common), architectures=['Qwen2ForCausalLM'],
             use_sliding_window=False, sliding_window=None)
  for k in ('attention_bias', 'mlp_bias'):  # Qwen2 always biases q/k/v, nothing else
    out.pop(k)
  return out


def qwen3_config(m, common: dict) -> dict:
  out = dict(llama_config(m, common), architectures=['Qwen3ForCausalLM'],
             use_sliding_window=False, sliding_window=None)
  out.pop('mlp_bias')
  return out


def mixtral_config(m, common: dict) -> dict:
  out = dict(llama_config(m, common), architectures=['MixtralForCausalLM'],
             intermediate_size=m.moe_mlp_dim or m.mlp_dim, num_local_experts=m.moe_experts,
             num_experts_per_tok=m.moe_top_k,
             router_aux_loss_coef=m.moe_aux_loss_weight / m.moe_top_k,
             output_router_logits=False, router_jitter_noise=0.0, sliding_window=None)
  for k in ('attention_bias', 'mlp_bias'):
    out.pop(k)
  return out


def mistral_config(m, common: dict) -> dict:
  out = dict(llama_config(m, common), architectures=['MistralForCausalLM'],
             sliding_window=m.sliding_window)
  for k in ('attention_bias', 'mlp_bias'):
    out.pop(k)
  return out


def qwen3_moe_config(m, common: dict) -> dict:
  return dict(qwen3_config(m, common), architectures=['Qwen3MoeForCausalLM'],
              num_experts=m.moe_experts, num_local_experts=m.moe_experts,  # transformers 4, 5
              num_experts_per_tok=m.moe_top_k,
              moe_intermediate_size=m.moe_mlp_dim or m.mlp_dim,
              norm_topk_prob=bool(m.moe_renormalize), decoder_sparse_step=1, mlp_only_layers=[],
              router_aux_loss_coef=m.moe_aux_loss_weight / m.moe_top_k,
              output_router_logits=False)


EXPORTERS = {'gpt2': gpt2_config, 'llama': llama_config, 'qwen2': qwen2_config,
             'qwen3': qwen3_config, 'mixtral': mixtral_config, 'mistral': mistral_config,
             'qwen3_moe': qwen3_moe_config}


def hf_config(m, vocab_size: int, bos_id=None, eos_id=None) -> dict:
  """The config.json dict for a jaxlm ``model`` section (its ``export_family``)."""
  kind = export_family(m)
  common = dict(model_type=kind, vocab_size=vocab_size, tie_word_embeddings=bool(m.tie_embeddings),
                bos_token_id=bos_id, eos_token_id=eos_id, torch_dtype='float32', dtype='float32')
  return EXPORTERS[kind](m, common)


# ---- parameters -----------------------------------------------------------------------

def _getter(tensors, prefixes: tuple[str, ...]):
  """get(name) -> the tensor as stored (a lazy view), trying each prefix (hub GPT-2 files
  lack 'transformer.')."""
  def get(name, default=None):
    for p in prefixes:
      if p + name in tensors:
        return tensors[p + name]
    if default is not None:
      return default
    raise CheckpointError(f"Hugging Face weights have no tensor '{prefixes[0]}{name}'")
  return get


def _norm(w, b=None) -> dict:
  return {'scale': w} if b is None else {'scale': w, 'bias': b}


def _dense(kernel, bias=None, use_bias=False) -> dict:
  out = {'kernel': kernel}
  if use_bias:
    out['bias'] = bias if bias is not None else np.zeros(kernel.shape[-1:], np.float32)
  return out


# The layer mappings only reshape, transpose and slice, so on lazy views they copy nothing:
# one parameter read later touches only its own tensors.

def _gpt2_layer(get, i, m) -> dict:
  """GPT-2 layer: Conv1D weights are [in, out]; c_attn packs q, k, v along out."""
  h, hd, d = m.n_heads, m.d_model // m.n_heads, m.d_model
  p = f'h.{i}.'
  qkv_w = np.split(get(p + 'attn.c_attn.weight'), 3, axis=1)  # 3 x [embed, heads*head_dim]
  qkv_b = np.split(get(p + 'attn.c_attn.bias'), 3)
  attn = {n: {'kernel': w.reshape(d, h, hd), 'bias': b.reshape(h, hd)}
          for n, w, b in zip(('query', 'key', 'value'), qkv_w, qkv_b)}
  attn['out'] = {'kernel': get(p + 'attn.c_proj.weight').reshape(h, hd, d),
                 'bias': get(p + 'attn.c_proj.bias')}
  return {'attn_norm': _norm(get(p + 'ln_1.weight'), get(p + 'ln_1.bias')),
          'mlp_norm': _norm(get(p + 'ln_2.weight'), get(p + 'ln_2.bias')),
          'attn': attn,
          'mlp': {'up': {'kernel': get(p + 'mlp.c_fc.weight'), 'bias': get(p + 'mlp.c_fc.bias')},
                  'down': {'kernel': get(p + 'mlp.c_proj.weight'),
                           'bias': get(p + 'mlp.c_proj.bias')}}}


def _llama_layer(get, i, m) -> dict:
  """Llama-style layer (Llama, Mistral, Qwen2, Qwen3): nn.Linear weights are [out, in]."""
  h, kv, d = m.n_heads, m.n_kv_heads, m.d_model
  hd = m.head_dim or d // h
  p = f'layers.{i}.'
  bias = lambda name: get(p + name + '.bias', np.zeros(0))  # absent: zeros if the model has one
  fix = lambda b, shape: None if not b.size else b.reshape(shape)
  attn = {}
  for name, heads in (('query', h), ('key', kv), ('value', kv)):
    proj = f'self_attn.{name[0]}_proj'  # [heads*head_dim, embed] -> [embed, heads, head_dim]
    attn[name] = _dense(get(p + proj + '.weight').reshape(heads, hd, d).transpose(2, 0, 1),
                        fix(bias(proj), (heads, hd)), m.use_bias or m.qkv_bias)
  attn['out'] = _dense(get(p + 'self_attn.o_proj.weight').reshape(d, h, hd).transpose(1, 2, 0),
                       fix(bias('self_attn.o_proj'), (d,)), m.use_bias)
  if m.qk_norm:
    attn['query_norm'] = _norm(get(p + 'self_attn.q_norm.weight'))
    attn['key_norm'] = _norm(get(p + 'self_attn.k_norm.weight'))
  if m.moe_experts:
    mlp = _moe_from_hf(get, p, m)
  else:
    mlp = {n: _dense(get(f'{p}mlp.{n}_proj.weight').T, fix(bias(f'mlp.{n}_proj'), (-1,)),
                     m.use_bias)
           for n in ('gate', 'up', 'down')}
  return {'attn_norm': _norm(get(p + 'input_layernorm.weight')),
          'mlp_norm': _norm(get(p + 'post_attention_layernorm.weight')),
          'attn': attn, 'mlp': mlp}


# Hub file layouts of an MoE block: (prefix, names of the gate/up/down expert weights).
_MOE_HUB = {'mixtral': ('block_sparse_moe.', ('w1', 'w3', 'w2')),
            'qwen3_moe': ('mlp.', ('gate_proj', 'up_proj', 'down_proj'))}


def _moe_from_hf(get, p: str, m) -> dict:
  """An HF MoE block -> jaxlm MoeMlp params (router [embed, experts], experts stacked).

  Hub files hold ``<prefix>experts.{j}.<gate/up/down>.weight`` ([out, in]);
  transformers 5 in memory fuses them as ``mlp.experts.gate_up_proj`` [experts,
  2*mlp, embed] (gate first) and ``mlp.experts.down_proj`` [experts, embed, mlp].
  """
  if get(p + 'mlp.experts.down_proj', np.zeros(0)).size:
    gate_up = get(p + 'mlp.experts.gate_up_proj')
    gate, up = np.split(gate_up.transpose(0, 2, 1), 2, axis=2)
    return {'router': get(p + 'mlp.gate.weight').T, 'gate': gate, 'up': up,
            'down': get(p + 'mlp.experts.down_proj').transpose(0, 2, 1)}
  prefix, names = _MOE_HUB['qwen3_moe' if m.qk_norm else 'mixtral']
  e = lambda j, w: get(f'{p}{prefix}experts.{j}.{w}.weight').T
  stack = lambda w: np.stack([e(j, w) for j in range(m.moe_experts)])
  return {'router': get(f'{p}{prefix}gate.weight').T,
          **{name: stack(w) for name, w in zip(('gate', 'up', 'down'), names)}}


def _moe_to_hf(moe: dict, p: str, m) -> dict[str, np.ndarray]:
  """jaxlm MoeMlp params -> the hub layout, which transformers 4 and 5 both load."""
  prefix, names = _MOE_HUB[export_family(m)]
  f32 = lambda x: np.asarray(x, np.float32)
  out = {f'{p}{prefix}gate.weight': f32(moe['router']).T}
  for j in range(m.moe_experts):
    for w, name in zip(names, ('gate', 'up', 'down')):
      out[f'{p}{prefix}experts.{j}.{w}.weight'] = f32(moe[name][j]).T
  return out


def _outside_layers(tensors, m):
  """(get, the layer mapping, {name: view} for embeddings, final norm and head)."""
  if m.position == 'learned':
    get = _getter(tensors, ('transformer.', ''))
    top = {'embed': {'embedding': get('wte.weight')},
           'pos_embed': {'embedding': get('wpe.weight')},
           'final_norm': _norm(get('ln_f.weight'), get('ln_f.bias'))}
    layer = _gpt2_layer
  else:
    get = _getter(tensors, ('model.', ''))
    top = {'embed': {'embedding': get('embed_tokens.weight')}, 'final_norm': _norm(get('norm.weight'))}
    layer = _llama_layer
  if not m.tie_embeddings:
    head = tensors['lm_head.weight'] if 'lm_head.weight' in tensors else None
    # Tied in the file but not in the config: the head starts as a copy of the embedding.
    top['head'] = {'kernel': (top['embed']['embedding'] if head is None else head).T}
  return get, layer, top


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _pick(tree, path):
  for k in path:
    tree = tree[k]
  return tree


class Leaf:
  """One jaxlm parameter computed on demand: ``leaf[idx]`` builds just that slice (a
  device's shard) in the parameter dtype from the lazy HF tensors; ``shape``."""

  def __init__(self, shape, read):
    self.shape, self._read = tuple(shape), read

  def __getitem__(self, idx) -> np.ndarray:
    idx = idx if isinstance(idx, tuple) else (idx,)
    return self._read(idx + (slice(None),) * (len(self.shape) - len(idx)))

  def full(self) -> np.ndarray:
    return self[()]


def _vocab_padded(x, axis: int, size: int, dtype):
  """x zero-padded to ``size`` along ``axis``, read slice by slice."""
  def read(idx):
    rows = range(size)[idx[axis]]
    assert rows.step == 1  # shards are contiguous slices
    lo, hi = rows.start, min(rows.stop, x.shape[axis])
    out = np.zeros([len(range(n)[i]) if a != axis else len(rows)
                    for a, (n, i) in enumerate(zip(x.shape, idx))], dtype)
    if hi > lo:
      src = tuple(slice(lo, hi) if a == axis else i for a, i in enumerate(idx))
      dst = tuple(slice(0, hi - lo) if a == axis else slice(None) for a in range(x.ndim))
      out[dst] = x[src]
    return out
  shape = list(x.shape)
  shape[axis] = size
  return Leaf(shape, read)


def param_leaves(tensors, m):
  """Yields ``(path, Leaf)`` for every jaxlm parameter of model section ``m``, in
  ``m.param_dtype`` (bf16 stays bf16; nothing is upcast first). A Leaf reads only the
  HF tensors (and, for stacked layers, only the layers) its requested slice needs.

  Layers are stacked on a leading ``[layers]`` axis under 'layers' when
  ``m.scan_layers``, else stored as 'layer_0', 'layer_1', ... The vocabulary
  rows (embedding rows, head columns) are zero-padded up to ``m.vocab_size``.
  """
  import jax.numpy as jnp  # noqa: PLC0415
  dtype = jnp.dtype(m.param_dtype)
  release = getattr(tensors, 'release', lambda: None)
  get, layer, top = _outside_layers(tensors, m)
  for path, x in _leaves(top):
    if path in (('embed', 'embedding'), ('head', 'kernel')):
      yield path, _vocab_padded(x, 0 if path[0] == 'embed' else 1, m.vocab_size, dtype)
    else:
      yield path, Leaf(x.shape, lambda idx, x=x: np.array(x[idx], dtype))
  for path, x0 in _leaves(layer(get, 0, m)):
    one = lambda i, path=path: _pick(layer(get, i, m), path)  # layer i's view

    def stacked(idx, one=one):
      layers = range(m.n_layers)[idx[0]]
      out = None
      for j, i in enumerate(layers):
        x = one(i)[idx[1:]]
        if out is None:
          out = np.empty((len(layers),) + x.shape, dtype)
        out[j] = x
        release()  # a strided slice touches every page of the layer's tensor: drop them
      return out

    if m.scan_layers:
      yield ('layers',) + path, Leaf((m.n_layers,) + x0.shape, stacked)
    else:
      for i in range(m.n_layers):
        yield (f'layer_{i}',) + path, Leaf(x0.shape, lambda idx, i=i, one=one: np.array(
            one(i)[idx], dtype))


def to_params(tensors, m) -> dict:
  """HF tensors -> the whole jaxlm params tree (numpy, ``m.param_dtype``); see param_leaves."""
  params: dict = {}
  for path, leaf in param_leaves(tensors, m):
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf.full()
  return params


def from_params(params: dict, m, vocab_size: int) -> dict[str, np.ndarray]:
  """jaxlm params (numpy) -> HF tensor dict; the vocab is cut to ``vocab_size`` rows."""
  out = {}
  for i in range(m.n_layers):
    out.update(layer_to_hf(layer_params(params, i, m), i, m))
  out.update(top_to_hf(lambda path: _pick(params, path) if _has(params, path) else None,
                       m, vocab_size))
  return out


def layer_params(params: dict, i: int, m) -> dict:
  """Layer ``i``'s params tree, from a stacked ('layers') or unstacked tree."""
  return _index(params['layers'], i) if 'layers' in params else params[f'layer_{i}']


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _bias(tree, shape) -> np.ndarray:
  return _f32(tree['bias']).reshape(shape) if 'bias' in tree else np.zeros(shape, np.float32)


def layer_to_hf(l: dict, i: int, m) -> dict[str, np.ndarray]:
  """One jaxlm layer's params (numpy) -> its HF tensors (float32, contiguous)."""
  out, a = {}, l['attn']
  if export_family(m) == 'gpt2':
    d, p = m.d_model, f'transformer.h.{i}.'
    for hf_name, norm in (('ln_1', 'attn_norm'), ('ln_2', 'mlp_norm')):
      out[f'{p}{hf_name}.weight'] = _f32(l[norm]['scale'])
      out[f'{p}{hf_name}.bias'] = _bias(l[norm], (d,))
    out[p + 'attn.c_attn.weight'] = np.concatenate(
        [_f32(a[n]['kernel']).reshape(d, d) for n in ('query', 'key', 'value')], axis=1)
    out[p + 'attn.c_attn.bias'] = np.concatenate(
        [_bias(a[n], (d,)) for n in ('query', 'key', 'value')])
    out[p + 'attn.c_proj.weight'] = _f32(a['out']['kernel']).reshape(d, d)
    out[p + 'attn.c_proj.bias'] = _bias(a['out'], (d,))
    out[p + 'mlp.c_fc.weight'] = _f32(l['mlp']['up']['kernel'])
    out[p + 'mlp.c_fc.bias'] = _bias(l['mlp']['up'], (m.mlp_dim,))
    out[p + 'mlp.c_proj.weight'] = _f32(l['mlp']['down']['kernel'])
    out[p + 'mlp.c_proj.bias'] = _bias(l['mlp']['down'], (d,))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
  p = f'model.layers.{i}.'
  out[p + 'input_layernorm.weight'] = _f32(l['attn_norm']['scale'])
  out[p + 'post_attention_layernorm.weight'] = _f32(l['mlp_norm']['scale'])
  for n in ('query', 'key', 'value'):
    k = _f32(a[n]['kernel'])  # [embed, heads, head_dim]
    out[f'{p}self_attn.{n[0]}_proj.weight'] = k.reshape(k.shape[0], -1).T
    if 'bias' in a[n]:
      out[f'{p}self_attn.{n[0]}_proj.bias'] = _f32(a[n]['bias']).reshape(-1)
  k = _f32(a['out']['kernel'])  # [heads, head_dim, embed]
  out[p + 'self_attn.o_proj.weight'] = k.reshape(-1, k.shape[-1]).T
  if 'bias' in a['out']:
    out[p + 'self_attn.o_proj.bias'] = _f32(a['out']['bias'])
  for n in ('query', 'key'):
    if f'{n}_norm' in a:
      out[f'{p}self_attn.{n[0]}_norm.weight'] = _f32(a[f'{n}_norm']['scale'])
  if m.moe_experts:
    out.update(_moe_to_hf(l['mlp'], p, m))
  else:
    for n in ('gate', 'up', 'down'):
      out[f'{p}mlp.{n}_proj.weight'] = _f32(l['mlp'][n]['kernel']).T
      if 'bias' in l['mlp'][n]:
        out[f'{p}mlp.{n}_proj.bias'] = _f32(l['mlp'][n]['bias'])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def top_to_hf(get, m, vocab_size: int):
  """Yields ``(HF name, float32 tensor)`` for the params outside the layers (embeddings,
  final norm, head), one at a time. ``get(path)`` returns one param (numpy) or None
  if the model has none; each is asked for when its tensor is built, so a caller
  reading them from storage holds one at a time."""
  gpt2 = export_family(m) == 'gpt2'
  pre = 'transformer.' if gpt2 else 'model.'
  emb = _f32(get(('embed', 'embedding'))[:vocab_size])
  yield pre + ('wte.weight' if gpt2 else 'embed_tokens.weight'), np.ascontiguousarray(emb)
  del emb
  if gpt2:
    yield pre + 'wpe.weight', _f32(get(('pos_embed', 'embedding')))
    yield pre + 'ln_f.weight', _f32(get(('final_norm', 'scale')))
    b = get(('final_norm', 'bias'))
    yield pre + 'ln_f.bias', (np.zeros((m.d_model,), np.float32) if b is None else _f32(b))
  else:
    yield pre + 'norm.weight', _f32(get(('final_norm', 'scale')))
  if not m.tie_embeddings:
    # [embed, vocab] -> [vocab, embed], cut before the copy
    yield 'lm_head.weight', np.ascontiguousarray(_f32(get(('head', 'kernel'))[:, :vocab_size].T))


def _has(tree, path) -> bool:
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return False
    tree = tree[k]
  return True


def _index(tree, i):
  if isinstance(tree, dict):
    return {k: _index(v, i) for k, v in tree.items()}
  return np.asarray(tree)[i]
