"""Wall time to validation loss <= 1.88 on shakespeare_char (nanoGPT's CPU recipe target).

Trains ``configs/shakespeare_char.py`` with jaxlm's own Trainer (the real train
step, data pipeline and hooks); a hook evaluates the validation split every
``eval.every`` steps and stops the run once the loss reaches the target. The
clock starts at process start, so Python/JAX import, data loading and
compilation all count, as they do for nanoGPT's ``time python train.py``.

    .venv/bin/python bench/shakespeare.py
    .venv/bin/python bench/shakespeare.py --target=1.88 --config.train.steps=800

Validation: ``eval.batches`` batches of ``eval.batch_size`` (or train.batch_size)
windows of ``data.seq_len`` tokens from the start of the held-out last 10% of
the text (data.val_fraction), the same every eval. With ``--full_val`` the loss
of the stopping parameters on the whole validation split is also printed
(outside the timed part).
"""

import time

_T_IMPORT = time.time()


def _process_start() -> float:
  """Unix time this process started (from /proc), else the time this module was imported."""
  try:
    with open('/proc/self/stat', encoding='ascii') as f:
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime', encoding='ascii') as f:
      uptime = float(f.read().split()[0])
    import os  # noqa: PLC0415
    return time.time() - uptime + start_ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError):
    return _T_IMPORT


T_START = _process_start()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))


import jax  # noqa: E402

from jaxlm import configs  # noqa: E402
from jaxlm.cli import main as cli  # noqa: E402
from jaxlm.data.pipeline import make_pipeline  # noqa: E402
from jaxlm.engine.build import Setup  # noqa: E402
from jaxlm.evals.hooks import Hook  # noqa: E402
from jaxlm.run import runtime  # noqa: E402
from jaxlm.run.loop import Trainer  # noqa: E402


def since_start() -> float:
  return time.time() - T_START


class TargetHook:
  """Every ``every`` steps: validation loss; stops the trainer once it is <= target."""

  def __init__(self, trainer: Trainer, batches, target: float, keep_going: bool = False):
    self.trainer, self.batches, self.target = trainer, batches, target
    self.keep_going = keep_going
    self.history = []  # (step, wall seconds since process start, val loss)
    self.reached = None  # (step, seconds, loss) of the first eval at or under target
    self.params = None

  def __call__(self, ctx):
    loss = ctx.eval_loss(self.batches)
    t = since_start()
    self.history.append((ctx.step, t, loss))
    print(f'step {ctx.step:5d}  {t:7.2f} s  val loss {loss:.4f}', flush=True)
    if loss <= self.target and self.reached is None:
      self.reached = (ctx.step, t, loss)
      self.params = ctx.params
      if not self.keep_going:
        self.trainer.request_stop()
    return {'bench/val_loss': loss}


def first_step_clock():
  """A hook printing, once, the wall time from process start to the end of the first step."""
  seen = []

  def fn(ctx):
    if not seen:
      jax.block_until_ready(ctx.state)
      seen.append(since_start())
      print(f'first step done: {seen[0]:.2f} s from process start', flush=True)

  return fn


def full_val_loss(cfg, params) -> float:
  """Mean loss over every window of the validation split (untimed check)."""
  n = len(make_pipeline(cfg).val_windows)
  bs = 64
  full = cfg.copy_and_resolve_references()
  full.eval.batch_size = bs
  full.eval.batches = -(-n // bs)
  setup = Setup(full)
  batches = make_pipeline(full).eval_batches()
  # eval_batches wraps around to fill the last batch; drop the repeated windows.
  extra = full.eval.batches * bs - n
  if extra:
    last = {k: v.copy() for k, v in batches[-1].items()}
    last['loss_mask'][bs - extra:] = 0.0
    batches = batches[:-1] + [last]
  return setup.eval_loss(params, batches)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--config', default='shakespeare_char')
  ap.add_argument('--target', type=float, default=1.88, help='validation loss to reach')
  ap.add_argument('--workdir', default='', help='default: a fresh temporary directory')
  ap.add_argument('--keep_going', action='store_true',
                  help='train all train.steps even after reaching the target (same-recipe runs)')
  ap.add_argument('--full_val', action='store_true',
                  help='also print the whole-validation-split loss at the stop (untimed)')
  args, rest = ap.parse_known_args(argv)

  os.chdir(REPO)  # the config's data.path is relative to the repo root
  cfg = cli.override(configs.load(args.config), rest)
  every = cfg.eval.every
  cfg.eval.every = 0  # the built-in eval runs only once, at the end; the hook below times evals
  workdir = args.workdir or tempfile.mkdtemp(prefix='jaxlm_shakespeare_')
  runtime.initialize()

  trainer = Trainer(cfg, workdir)
  batches = make_pipeline(cfg).eval_batches()
  hook = TargetHook(trainer, batches, args.target, args.keep_going)
  trainer.add_hook(Hook(hook, every=every, at_end=False, name='target'))
  trainer.add_hook(Hook(first_step_clock(), every=1, at_end=False, name='first_step'))
  print(f'config {Path(args.config).name} {" ".join(rest)}; eval every {every} steps on '
        f'{len(batches)} val batches x {batches[0]["inputs"].shape}; workdir {workdir}', flush=True)
  out = trainer.run()
  t_end = since_start()

  m = cfg.model
  print(f'model: {m.n_layers}L/{m.n_heads}H/{m.d_model}d, {m.position}/{m.norm}/{m.activation}; '
        f'batch {cfg.train.batch_size} x {cfg.data.seq_len}, lr {cfg.optim.lr}, '
        f'steps {cfg.train.steps}; devices {jax.devices()}')
  final = hook.history[-1] if hook.history else (out['step'], t_end, out.get('eval/loss'))
  if hook.reached:
    step, t, loss = hook.reached
    print(f'REACHED val loss {loss:.4f} <= {args.target} at step {step}: '
          f'{t:.1f} s wall from process start (compile included)')
  else:
    print(f'NOT REACHED: val loss {final[2]:.4f} > {args.target} after {out["step"]} steps')
  print(f'final val loss {out.get("eval/loss", final[2]):.4f} (step {out["step"]}); '
        f'whole command {t_end:.1f} s (includes the final checkpoint and eval)')
  if args.full_val and hook.params is not None:
    print(f'full validation split loss at the stop: '
          f'{full_val_loss(cfg, hook.params):.4f} (untimed)')
  return 0 if hook.reached else 1


if __name__ == '__main__':
  sys.exit(main())
