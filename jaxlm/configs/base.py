"""Every jaxlm config field, its default, and what it means.

Size files (``configs/<size>.py``) call ``base.get_config()`` and change only
what differs. The returned config is locked, so a mistyped key raises.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'base'  # run name shown in logs

  # ---- model: one Transformer; GPT-2 vs Llama is a choice of these fields.
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 320  # embedding rows; >= tokenizer vocab (padded for speed)
  # Token ids in use; rows from here to vocab_size are padding (an HF import pads to a
  # multiple of 128 so the vocab splits on any mesh) and their logits are masked. 0 = all.
  m.vocab_used = 0
  m.d_model = 128  # residual stream width
  m.n_layers = 2  # Transformer blocks
  m.n_heads = 4  # query heads
  m.n_kv_heads = 4  # key/value heads (< n_heads means grouped-query attention)
  m.head_dim = 0  # per-head width; 0 means d_model // n_heads
  m.mlp_dim = 512  # hidden width of the MLP (per branch for SwiGLU)
  m.max_seq_len = 256  # longest sequence the model supports (learned positions table size)
  m.norm = 'layernorm'  # 'layernorm' (GPT-2) or 'rmsnorm' (Llama)
  m.norm_eps = 1e-5  # epsilon inside the norm
  m.activation = 'gelu'  # 'gelu' (GPT-2 MLP, tanh-approximate), 'gelu_exact' (erf) or 'swiglu' (Llama)
  m.position = 'learned'  # 'learned' (GPT-2) or 'rope' (Llama)
  m.rope_theta = 10000.0  # RoPE base frequency
  m.rope_scaling = ''  # '' (plain RoPE) or 'llama3' (Llama 3.1 long-context frequency scaling)
  m.rope_factor = 8.0  # llama3 scaling: low frequencies are divided by this
  m.rope_low_freq_factor = 1.0  # llama3 scaling: wavelengths above original_len / this are scaled
  m.rope_high_freq_factor = 4.0  # llama3 scaling: wavelengths below original_len / this are kept
  m.rope_original_max_len = 8192  # llama3 scaling: context length the model was pretrained at
  m.qkv_bias = False  # bias on the query/key/value projections only (Qwen2); use_bias covers all
  m.qk_norm = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
  m.use_bias = True  # biases in dense layers and norms (GPT-2 yes, Llama no)
  m.tie_embeddings = True  # output head reuses the token embedding (GPT-2)
  m.init_std = 0.02  # normal init std for kernels and embeddings
  m.param_dtype = 'float32'  # dtype parameters are stored in
  m.dtype = 'float32'  # compute dtype ('bfloat16' for mixed precision)
  m.attention = 'xla'  # 'xla' reference, 'chunked' (flash, any backend), 'splash' (TPU), 'pallas_gpu'/'cudnn' (GPU)
  m.attention_chunk = 512  # key/query block size of chunked attention
  m.sliding_window = 0  # attend only to the latest N tokens, self included (Mistral); 0 = off
  m.loss_chunk = 2048  # positions per cross-entropy block: fp32 logits [batch, chunk, vocab_chunk] at a time
  m.loss_vocab_chunk = 8192  # vocab entries per cross-entropy block when positions are chunked
  m.scan_layers = True  # nn.scan over blocks: one compiled block, stacked params
  m.remat = 'none'  # activation checkpointing: 'none', 'full', 'dots' (save matmul outputs), 'minimal' (save attention)
  # Mixture of Experts (jaxlm/model/moe.py; README "Mixture of Experts"). Needs swiglu.
  m.moe_experts = 0  # routed experts per MoE layer (0 = dense MLP in every layer)
  m.moe_top_k = 2  # experts each token is sent to
  m.moe_shared_experts = 0  # always-on experts added to the routed ones (0 = Mixtral style)
  m.moe_every = 1  # every k-th layer is MoE (the others dense): 1 = all, 2 = every other
  m.moe_mlp_dim = 0  # hidden width of each expert (0 = mlp_dim)
  m.moe_capacity_factor = 0.0  # 0 = dropless; > 0 = fixed capacity, overflowing tokens dropped
  m.moe_renormalize = True  # top-k weights renormalized to sum to 1 (Mixtral); False = raw softmax
  m.moe_aux_loss_weight = 0.01  # weight of the load-balancing loss in the training loss
  m.moe_z_loss_weight = 0.001  # weight of the router z-loss (keeps router logits small)
  # Pipeline (jaxlm/model/pipeline.py; README "Pipeline parallelism"), used when
  # mesh.pipeline x mesh.dcn_pipeline > 1: the layer stack is split into that many stages.
  m.pipeline_microbatches = 0  # micro-batches in flight through the stages (>= stages; 0 = stages)
  m.pipeline_repeats = 1  # circular schedule: layer groups per stage (bubble / repeats)

  # ---- data: where tokens come from and how they are packed.
  d = c.data = ml_collections.ConfigDict()
  d.source = 'text'  # 'text', 'jsonl', 'arrayrecord', 'pystdlib' (this Python's stdlib .py files)
  # or 'pairs' (JSONL of {"prompt", "response"}: supervised fine-tuning, loss on responses only)
  d.path = ''  # file, directory or glob for text/jsonl/arrayrecord
  d.mixture = ''  # 'path1:0.7,path2:0.3' weighted sources (same data.source/tokenizer); '' = data.path only
  d.jsonl_field = 'text'  # JSONL key holding the document text
  d.eval_path = ''  # 'pairs': held-out pairs JSONL scored as eval/loss ('' = no eval loss)
  d.tokenizer = 'byte'  # 'byte', 'char', 'sentencepiece' (.model file) or 'hf' (tokenizer.json)
  d.tokenizer_path = ''  # sentencepiece/hf file; for 'char' the text whose characters are the
  # vocabulary ('' = data.path, as nanoGPT's shakespeare_char builds its 65 ids)
  # Set by `jaxlm train` (never by hand): the run's own copy of its tokenizer is
  # <workdir>/tokenizer/ (data.tokenizer_path points there); its content hash and size.
  d.tokenizer_sha256 = ''  # sha256 of the copy ('' = none recorded: 'byte', or an older run)
  d.tokenizer_vocab = 0  # its vocabulary size (0 = not recorded)
  d.seq_len = 128  # tokens per training sequence
  d.add_bos = False  # prepend BOS to every document
  d.add_eos = True  # append EOS to every document
  d.val_tokens = 4_000_000  # tokens held out from the end of each store for validation...
  d.val_fraction = 0.1  # ...but at most this fraction of it (so small corpora still train)
  d.seed = 0  # shuffle seed
  d.shuffle = True  # shuffle training windows each epoch
  d.max_docs = 0  # read at most this many documents (0 = all)
  d.worker_count = 0  # Grain worker processes (0 = in the main process)
  # Batches Grain's reader threads prepare ahead (0 = read in the train loop's thread, which
  # is cheapest for in-memory or local data: threads cost ~0.5 ms CPU per batch; stores on
  # gs:// / s3:// read ahead on their own, per data.read_ahead).
  d.prefetch = 0
  # Stores on gs:// / s3:// (one ranged GET per window, tens of ms each): a batch's windows are
  # fetched together, and batches ahead of the step, so the defaults keep up without prefetch.
  d.read_requests = 64  # remote stores: ranged GETs in flight at once per batch
  d.read_ahead = 2  # remote stores: batches read ahead of the one asked for (0 = none)

  # ---- training.
  t = c.train = ml_collections.ConfigDict()
  t.steps = 1000  # optimizer steps
  t.batch_size = 32  # global batch (sequences per step, summed over all devices)
  t.grad_accum = 1  # micro-batches per step (batch_size must divide by it)
  t.seed = 0  # parameter init and dropout RNG seed
  t.log_every = 10  # steps between metric lines
  t.z_loss = 0.0  # weight of the z-loss (log-partition squared) term
  t.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 means look up the platform
  t.profile_steps = ''  # 'start,stop' writes a jax.profiler trace for those steps
  t.progress = True  # a tqdm bar when stderr is a terminal (step lines are logged either way)
  # Non-finite loss/gradients skip a step on device (params and optimizer state kept, counted
  # in train/skipped_steps); this many skipped steps in a row stop the run with exit code 3.
  t.max_bad_steps = 8
  t.spike_factor = 0.0  # also skip a step whose loss > this x its running mean (0 = off; e.g. 3)
  # Warm start (jaxlm/engine/warm_start.py): a new run takes its parameters (only: optimizer, schedule
  # and data start fresh) from this jaxlm workdir or Hugging Face model directory ('' = init).
  t.init_from = ''
  t.init_from_step = -1  # checkpoint step of a workdir init_from (-1 = its latest; saved resolved)
  # Hang watchdog (jaxlm/run/watchdog.py): a step, hook or save running longer than this many
  # seconds writes every thread's stack and exits 75 (0 = off; -1 = automatic: max(10 x the mean
  # step, 10 min) per step, 3x that for the first steps, evals and saves).
  t.step_timeout = -1.0
  # Seconds between SIGTERM and the machine being taken (Spot/preemptible VMs: ~30): the run
  # saves, and if that would not end in time it exits 75 a little before, naming the phase
  # that took too long (0 = no limit).
  t.preemption_grace = 0.0

  # ---- optimizer (optax AdamW).
  o = c.optim = ml_collections.ConfigDict()
  o.lr = 3e-4  # peak learning rate
  o.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio
  o.warmup_steps = 100  # linear warmup steps
  o.schedule = 'cosine'  # decay after warmup: 'cosine', 'linear', 'constant' or 'wsd'
  # Steps the schedule decays over (0 = train.steps); saved resolved in config.json, so a
  # resumed run with a new train.steps keeps the lr continuous or is refused (see README).
  o.decay_steps = 0
  o.decay_fraction = 0.1  # 'wsd': decay linearly over this last fraction of decay_steps
  o.b1 = 0.9  # Adam beta1
  o.b2 = 0.95  # Adam beta2
  o.eps = 1e-8  # Adam epsilon
  o.weight_decay = 0.1  # decoupled weight decay (kernels only; see decay_exclude)
  o.decay_exclude = 'norm,bias,embed'  # comma list of param-path substrings not decayed
  o.clip_norm = 1.0  # global gradient-norm clip (0 disables)
  o.mu_dtype = ''  # dtype of Adam's first moment ('bfloat16' saves memory; '' = param dtype)

  # ---- evaluation.
  e = c.eval = ml_collections.ConfigDict()
  e.every = 200  # steps between validation-loss evals (0 = only at the end)
  e.batches = 8  # validation batches per eval
  e.batch_size = 0  # sequences per eval batch (0 = the train micro-batch); run in micro-batches
  e.sample_every = 0  # steps between text samples from sample_prompts (0 = off)
  e.sample_prompts = ''  # '|'-separated prompts for periodic samples
  e.sample_tokens = 64  # tokens generated per sample
  e.hooks = ''  # comma list of 'module:function' user hooks, called every eval.every steps
  e.multiple_choice = ''  # JSONL of {context, choices, label} scored every eval.every steps ('' = off)
  e.lm_eval_tasks = ''  # comma list of lm-evaluation-harness tasks run every eval.every steps ('' = off; needs jaxlm[eval])
  e.lm_eval_include = ''  # folder of extra lm-eval task YAMLs (local tasks), '' = the built-in tasks only
  e.lm_eval_limit = 0  # examples per lm-eval task (0 = all)
  e.lm_eval_fewshot = -1  # few-shot examples per lm-eval prompt (-1 = each task's default)

  # ---- checkpoints (Orbax).
  k = c.checkpoint = ml_collections.ConfigDict()
  k.every = 500  # steps between checkpoints (a final one is always written)
  k.keep = 3  # most recent checkpoints kept
  k.keep_period = 0  # also keep every Nth step forever (0 = off)
  k.keep_best = 0  # also keep the N lowest-eval-loss checkpoints in checkpoints_best (0 = off)
  k.async_save = True  # save in the background while training continues

  # ---- device mesh: product of all axes must equal the device count; -1 = the rest.
  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.pipeline = 1  # pipeline stages inside a slice (layer stack split; see model.pipeline_*)
  mesh.data = -1  # pure data parallel (replicated params)
  mesh.fsdp = 1  # fully sharded data parallel (params/grads/opt state sharded)
  mesh.expert = 1  # expert parallel: MoE experts split, tokens sent all-to-all (batch split too)
  mesh.tensor = 1  # Megatron tensor parallel (heads and MLP hidden split)
  mesh.sequence = 1  # sequence/context parallel (length split)
  mesh.dcn_data = 1  # data-parallel replicas across slices/hosts (DCN)
  mesh.dcn_fsdp = 1  # FSDP across slices/hosts (DCN)
  mesh.dcn_pipeline = 1  # pipeline stages across slices/hosts (DCN): the least traffic of any axis
  mesh.rules = ''  # overrides of logical-axis rules, e.g. 'mlp=tensor;embed=fsdp'
  c.lock()  # a mistyped key in a size file or override raises
  return c
