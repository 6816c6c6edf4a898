"""What a person (or a log scraper) reads while a run trains: one line per log step.

Every ``train.log_every`` steps, on stderr, whether or not a bar is shown:

  step 200/1000 | loss 2.3456 | lr 3.00e-04 | grad norm 0.812 | tokens/s 17,012 | MFU 3.1% | elapsed 0:00:31 / ETA 0:02:04

and after each eval ``step 200/1000 | eval/loss 2.4012 | eval/perplexity 11.04 | eval 1.3s``.
The tqdm bar is drawn only when stderr is a terminal: in a batch job's log its
``\\r`` redraws would be noise. tokens/s and MFU come from the loop, which times
steps after the first (compile) one and leaves eval and checkpoint time out;
ETA divides the remaining steps by the observed wall time per step since the
first step finished, evals included, so it is what the run will really take.
"""

import datetime
import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger('jaxlm')


def _clock(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def train_line(step: int, total: int, m: dict, elapsed: float, eta: float | None) -> str:
  """The log line of a train step from its metrics (``train/...`` keys)."""
  parts = [f'step {step}/{total}', f"loss {m['train/loss']:.4f}", f"lr {m['train/lr']:.2e}",
           f"grad norm {m['train/grad_norm']:.3f}"]
  if 'train/tokens_per_sec' in m:
    parts += [f"tokens/s {m['train/tokens_per_sec']:,.0f}", f"MFU {100 * m['train/mfu']:.1f}%"]
  else:  # the first step of a process compiles; its time says nothing about speed
    parts += ['tokens/s - (compile)', 'MFU -']
  parts.append(f"elapsed {_clock(elapsed)} / ETA {'-' if eta is None else _clock(eta)}")
  return ' | '.join(parts)


def eval_line(step: int, total: int, out: dict, seconds: float) -> str | None:
  """The log line of the evals a step ran (None when none ran)."""
  shown = {k: v for k, v in out.items() if k.startswith('eval/') and isinstance(v, (int, float))}
  if not shown:
    return None
  return ' | '.join([f'step {step}/{total}', *(f'{k} {v:.4f}' for k, v in shown.items()),
                     f'eval {seconds:.1f}s'])


class Progress:
  """Step and eval lines for one run; a tqdm bar too when ``bar`` and stderr is a TTY.

  ``started(step)``: the first step (the compile) has finished, which starts the
  ETA clock. ``close()`` removes the bar.
  """

  def __init__(self, total: int, start_step: int, bar: bool):
    self.total = total
    self.t0 = time.perf_counter()
    self._eta_from = None  # (time, step) once the first step finished
    self.bar = None
    if bar and sys.stderr.isatty():
      self.bar = tqdm(total=total, initial=start_step, desc='train', unit='step',
                      dynamic_ncols=True, file=sys.stderr)

  def started(self, step: int) -> None:
    self._eta_from = (time.perf_counter(), step)

  def _eta(self, step: int) -> float | None:
    if self._eta_from is None or step <= self._eta_from[1]:
      return None
    t, s = self._eta_from
    return (time.perf_counter() - t) / (step - s) * (self.total - step)

  def _emit(self, line: str) -> None:
    if self.bar is not None:  # above the bar, which is then redrawn
      self.bar.write(time.strftime('%H:%M:%S ') + 'jaxlm: ' + line, file=sys.stderr)
    else:
      log.info('%s', line)

  def train(self, step: int, metrics: dict) -> None:
    self._emit(train_line(step, self.total, metrics, time.perf_counter() - self.t0,
                          self._eta(step)))
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")

  def eval(self, step: int, out: dict, seconds: float) -> None:
    line = eval_line(step, self.total, out, seconds)
    if line:
      self._emit(line)

  def update(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
