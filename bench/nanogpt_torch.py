"""The nanoGPT shakespeare_char CPU recipe in plain PyTorch, for side-by-side timing.

This is a small re-implementation (not nanoGPT's code) of what nanoGPT's
``python train.py config/train_shakespeare_char.py --device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
--n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``
trains: a GPT-2 block stack without biases (LayerNorm, GELU MLP, learned
positions, tied embeddings, 65-character vocabulary), AdamW lr 1e-3 with 100
warmup iterations and a cosine to 1e-4, betas (0.9, 0.99), weight decay 0.1 on
2-D tensors, grad clip 1.0, eval every 250 iterations over 20 random batches
of each split. Data: first 90% of ``tinyshakespeare.txt`` for training, the
last 10% for validation, as nanoGPT's ``prepare.py`` splits it.

Prints the validation loss at each eval, the first time it is <= ``--target``
and the wall time from process start, so it can be compared with
``bench/shakespeare.py`` on the same machine:

    .venv/bin/python bench/nanogpt_torch.py    # needs torch: the hf extra, which `make test` installs
"""

import time

T0 = time.time()

import argparse  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Block(nn.Module):

  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.ln1 = nn.LayerNorm(d, bias=False)
    self.qkv = nn.Linear(d, 3 * d, bias=False)
    self.proj = nn.Linear(d, d, bias=False)
    self.ln2 = nn.LayerNorm(d, bias=False)
    self.fc = nn.Linear(d, 4 * d, bias=False)
    self.out = nn.Linear(4 * d, d, bias=False)

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
    q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
    return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):

  def __init__(self, vocab, block, layers, heads, d):
    super().__init__()
    self.wte = nn.Embedding(vocab, d)
    self.wpe = nn.Embedding(block, d)
    self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
    self.ln_f = nn.LayerNorm(d, bias=False)
    self.head = nn.Linear(d, vocab, bias=False)
    self.wte.weight = self.head.weight
    for name, p in self.named_parameters():
      if p.dim() == 2:
        std = 0.02 / math.sqrt(2 * layers) if name.endswith(('proj.weight', 'out.weight')) else 0.02
        nn.init.normal_(p, 0.0, std)

  def forward(self, idx, targets):
    x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
    for blk in self.blocks:
      x = blk(x)
    logits = self.head(self.ln_f(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--data', default=str(REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt'))
  ap.add_argument('--iters', type=int, default=2000)
  ap.add_argument('--target', type=float, default=1.88)
  ap.add_argument('--seed', type=int, default=1337)
  args = ap.parse_args()

  torch.manual_seed(args.seed)
  text = Path(args.data).read_text(encoding='utf-8')
  chars = sorted(set(text))
  lut = {c: i for i, c in enumerate(chars)}
  ids = np.array([lut[c] for c in text], dtype=np.int64)
  n = int(0.9 * len(ids))
  splits = {'train': torch.from_numpy(ids[:n]), 'val': torch.from_numpy(ids[n:])}
  block, batch, eval_iters, eval_every = 64, 12, 20, 250
  lr, min_lr, warmup = 1e-3, 1e-4, 100

  def get_batch(split):
    data = splits[split]
    ix = torch.randint(len(data) - block, (batch,))
    x = torch.stack([data[i:i + block] for i in ix])
    y = torch.stack([data[i + 1:i + 1 + block] for i in ix])
    return x, y

  model = GPT(len(chars), block, 4, 4, 128)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1},
                           {'params': no_decay, 'weight_decay': 0.0}], lr=lr, betas=(0.9, 0.99))

  def lr_at(it):
    if it < warmup:
      return lr * (it + 1) / (warmup + 1)
    ratio = (it - warmup) / (args.iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

  @torch.no_grad()
  def val_loss():
    model.eval()
    out = float(torch.stack([model(*get_batch('val')) for _ in range(eval_iters)]).mean())
    model.train()
    return out

  reached = None
  step_times = []
  for it in range(args.iters + 1):
    if it % eval_every == 0:
      # nanoGPT's estimate_loss also evaluates the train split; it costs as much as val.
      with torch.no_grad():
        model.eval()
        for _ in range(eval_iters):
          model(*get_batch('train'))
        model.train()
      loss = val_loss()
      t = time.time() - T0
      print(f'iter {it:5d}  {t:7.2f} s  val loss {loss:.4f}', flush=True)
      if reached is None and loss <= args.target:
        reached = (it, t, loss)
    if it == args.iters:
      break
    for g in opt.param_groups:
      g['lr'] = lr_at(it)
    t_step = time.perf_counter()
    loss = model(*get_batch('train'))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    step_times.append(time.perf_counter() - t_step)

  ms = 1e3 * float(np.median(step_times[10:]))
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; '
        f'median {ms:.1f} ms/iter = {batch * block / ms * 1e3:,.0f} tokens/s')
  if reached:
    print(f'REACHED val loss {reached[2]:.4f} <= {args.target} at iter {reached[0]}: '
          f'{reached[1]:.1f} s wall from process start')
  else:
    print(f'NOT REACHED: val loss {loss:.4f} > {args.target}')
  print(f'whole command {time.time() - T0:.1f} s')


if __name__ == '__main__':
  main()
