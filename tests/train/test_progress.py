"""Step and eval lines on stderr with and without a terminal; the bar only on a terminal."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from jaxlm.run import progress

LINE = re.compile(r'jaxlm: step (\d+)/12 \| loss [\d.]+ \| lr [\d.e+-]+ \| grad norm [\d.]+ \| '
                  r'(tokens/s [\d,]+ \| MFU [\d.]+%|tokens/s - \(compile\) \| MFU -) \| '
                  r'elapsed \d+:\d\d:\d\d / ETA (\d+:\d\d:\d\d|-)')
EVAL = re.compile(r'jaxlm: step (\d+)/12 \| eval/loss [\d.]+ \| eval/perplexity [\d.]+ \| eval ')


def _train_argv(tiny_cfg, workdir):
  return [sys.executable, '-m', 'jaxlm', 'train', '--config=tiny', f'--workdir={workdir}',
          f'--config.data.path={tiny_cfg.data.path}', '--config.train.steps=12',
          '--config.train.log_every=4', '--config.eval.every=8', '--config.train.progress=True']


def _with_pty(argv, cwd) -> str:
  """stderr of ``argv`` run with stdout and stderr on a pseudo-terminal."""
  leader, follower = pty.openpty()
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 120, 0, 0))  # 24 x 120
  proc = subprocess.Popen(argv, cwd=cwd, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
  os.close(follower)
  chunks = []
  while True:
    try:
      data = os.read(leader, 1 << 16)
    except OSError:  # EIO: the child closed the terminal
      break
    if not data:
      break
    chunks.append(data)
  assert proc.wait(timeout=300) == 0
  os.close(leader)
  return b''.join(chunks).decode('utf-8', 'replace')


def _check_lines(err: str) -> None:
  steps = [int(m.group(1)) for m in LINE.finditer(err)]
  assert steps == [1, 4, 8, 12], err
  assert 'tokens/s - (compile)' in LINE.search(err).group(0)  # step 1 is not timed
  assert all('ETA -' not in m.group(0) for m in LINE.finditer(err) if m.group(1) != '1')
  assert [int(m.group(1)) for m in EVAL.finditer(err)] == [8, 12], err


def test_lines_without_a_terminal_and_no_bar(tiny_cfg, tmp_path, repo):
  proc = subprocess.run(_train_argv(tiny_cfg, tmp_path / 'w'), cwd=repo, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  _check_lines(proc.stderr)
  assert '\r' not in proc.stderr and 'step/s' not in proc.stderr and 'it/s' not in proc.stderr


def test_lines_and_bar_on_a_terminal(tiny_cfg, tmp_path, repo):
  err = _with_pty(_train_argv(tiny_cfg, tmp_path / 'w'), repo)
  _check_lines(err.replace('\r\n', '\n'))
  assert re.search(r'\rtrain: +\d+%', err), err  # tqdm redraws its bar with a carriage return


def test_line_format():
  m = {'train/loss': 2.5, 'train/lr': 3e-4, 'train/grad_norm': 0.5,
       'train/tokens_per_sec': 17012.4, 'train/mfu': 0.031}
  assert progress.train_line(200, 1000, m, 31.0, 124.0) == (
      'step 200/1000 | loss 2.5000 | lr 3.00e-04 | grad norm 0.500 | tokens/s 17,012 | '
      'MFU 3.1% | elapsed 0:00:31 / ETA 0:02:04')
  assert progress.eval_line(8, 12, {'eval/loss': 2.0, 'samples': 'x'}, 1.25) == (
      'step 8/12 | eval/loss 2.0000 | eval 1.2s')
  assert progress.eval_line(8, 12, {'train/x': 1.0}, 0.0) is None
