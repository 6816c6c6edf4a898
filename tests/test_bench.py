"""The benchmark scripts measure what they say (tiny configs, a few steps)."""

import math
import os
import statistics
import subprocess
import sys
import time

import jax
import pytest

from conftest import REPO, SHAKESPEARE

sys.path.insert(0, str(REPO / 'bench'))


def test_throughput_agrees_with_an_independent_clock(capsys, monkeypatch):
  import step_speed  # noqa: PLC0415
  import throughput  # noqa: PLC0415
  # Time every call of the bench's step timer from outside, waiting for the state
  # ourselves: a bench that stops its clock before the device finishes, or counts
  # tokens per device as global, reports a rate this clock does not see.
  calls = []
  inner = step_speed.time_steps

  def timed(setup, state, batches, steps):
    t0 = time.perf_counter()
    secs, state = inner(setup, state, batches, steps)
    jax.block_until_ready(state)
    calls.append((steps, time.perf_counter() - t0))
    return secs, state

  monkeypatch.setattr(step_speed, 'time_steps', timed)
  r = throughput.main(['--config', 'tiny', '--steps', '5', '--repeats', '3', '--warmup', '1',
                       '--config.train.batch_size=16'])
  assert r['devices'] == 8 and r['tokens_per_step'] == 16 * 32
  assert [n for n, _ in calls] == [1, 1, 5, 5, 5]  # compile, warmup, 3 timed windows
  wall_rate = statistics.median(r['tokens_per_step'] * n / t for n, t in calls[2:])
  assert wall_rate <= r['tokens_per_sec'] <= 1.5 * wall_rate, (r, calls)
  wall_step_ms = statistics.median(t / n for n, t in calls[2:]) * 1e3
  assert wall_step_ms / 1.5 <= r['step_ms'] <= wall_step_ms, (r, calls)
  assert r['tokens_per_sec_per_device'] == pytest.approx(r['tokens_per_sec'] / 8)
  assert calls[0][1] <= r['compile_s'] <= calls[0][1] + 0.5  # its clock wraps our call
  assert 0 < r['mfu'] < 1
  assert r['peak_memory_gib'] > 0
  out = capsys.readouterr().out
  assert 'tokens/s/device' in out and 'MFU' in out


@pytest.mark.skipif(not (REPO.parent / 'shared' / 'peers' / 'nanoGPT').is_dir(),
                    reason='needs ../shared/peers/nanoGPT')
def test_side_by_side_reads_the_real_nanogpt_and_scores_both_models_on_the_same_windows(monkeypatch, tmp_path):
  """The real nanoGPT's own log lines (iteration times, evals) are parsed, not guessed."""
  pytest.importorskip('torch')
  sys.path.insert(0, str(REPO / 'bench'))
  monkeypatch.setenv('OMP_NUM_THREADS', '1')
  import nanogpt_side_by_side as sbs  # noqa: PLC0415
  root = sbs.prepare_nanogpt(REPO.parent / 'shared' / 'peers' / 'nanoGPT',
                             REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt')
  try:
    t0 = time.time()
    r = sbs.run_nanogpt(root, iters=4, target=100.0, keep=tmp_path / 'nanogpt.pt', eval_every=2)
    wall = time.time() - t0
    windows = sbs.val_windows((REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt').read_text())
    nanogpt_val = sbs.nanogpt_full_val(root, tmp_path / 'nanogpt.pt', windows[:240])
  finally:
    sbs.shutil.rmtree(root)
  assert len(windows) == 1740 and {len(w) for w in windows} == {65}
  # The final model on our windows agrees with nanoGPT's own (random-window) val estimate.
  assert abs(nanogpt_val - r['final_val']) < 0.03 and nanogpt_val < math.log(65)
  # jaxlm's eval reads the same split (data.val_fraction 0.1 of this ASCII text) from its
  # first window: on those 240 windows the final model must give its own eval's loss.
  monkeypatch.setenv('XLA_FLAGS', '')  # one CPU device, as a user's run (not this process's 8)
  j = sbs.run_jaxlm(3, 100.0, ['--config.data.path=' + str(SHAKESPEARE)], str(tmp_path / 'jaxlm'))
  score = (f'import nanogpt_side_by_side as s; w = s.val_windows(open({str(SHAKESPEARE)!r}).read()); '
           f"print(s.jaxlm_full_val({str(tmp_path / 'jaxlm')!r}, w[:240]))")
  out = subprocess.run([sys.executable, '-c', score], cwd=REPO / 'bench', check=True, text=True,
                       capture_output=True, env={**os.environ, 'PYTHONPATH': str(REPO)}).stdout
  assert abs(float(out.split()[-1]) - j['final_val']) < 1e-4
  # Iterations 0, 2, 4 evaluate (val loss ~ln 65 near init) and are left out of the speed.
  assert [round(v) for _, v in r['evals']] == [4, 4, 4]
  assert 0 < r['wall_to_target'] == r['evals'][0][0] < wall
  assert 0 < r['startup'] < wall and r['final_val'] == r['evals'][-1][1]
  assert 12 * 64 / wall < r['tokens_per_sec'] < 1e7
