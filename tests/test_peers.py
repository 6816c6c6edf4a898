"""Peer heartbeats: a silent peer, and one that leaves with a reason, end the others boundedly."""

import socket
import time

from jaxlm.run import peers


def _pair(timeout):
  socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
  for s in socks:
    s.bind(('127.0.0.1', 0))
  table = [('127.0.0.1', s.getsockname()[1], f'host{i}') for i, s in enumerate(socks)]
  lost = [[], []]
  watches = [peers.PeerWatch(i, table, socks[i], timeout, interval=0.05,
                             on_lost=lost[i].append) for i in range(2)]
  return watches, lost


def _wait(cond, limit):
  deadline = time.monotonic() + limit
  while not cond() and time.monotonic() < deadline:
    time.sleep(0.02)


def test_a_silent_peer_is_named_after_the_timeout():
  (a, b), lost = _pair(timeout=0.6)
  a.start(), b.start()
  time.sleep(0.3)
  assert lost == [[], []]  # both alive: nothing reported
  b.stop()  # process 1 "dies": no goodbye
  t0 = time.monotonic()
  _wait(lambda: lost[0], 5)
  assert 0.4 < time.monotonic() - t0 < 2.0
  assert lost[0][0].startswith('process 1 (host host1) stopped responding: no heartbeat for')
  a.stop()


def test_a_peer_that_leaves_with_a_reason_ends_the_others_at_once_and_done_does_not():
  (a, b), lost = _pair(timeout=30)
  a.start(), b.start()
  b.leave('step 12 did not finish in 20 s')
  _wait(lambda: lost[0], 5)
  assert lost[0] == ['process 1 (host host1) stopped: step 12 did not finish in 20 s']
  a.stop(), b.stop()

  (a, b), lost = _pair(timeout=0.5)
  a.start(), b.start()
  time.sleep(0.2)
  b.leave()  # finished normally: its silence from now on is expected
  time.sleep(1.5)
  assert lost == [[], []]
  a.stop(), b.stop()


def test_the_exit_line_names_the_last_committed_step(tmp_path):
  d = tmp_path / 'checkpoints'
  for name in ('5', '10', '15.orbax-checkpoint-tmp-3'):
    (d / name).mkdir(parents=True)
  assert peers.describe_committed(str(d)) == f'step 10 in {d}'
  assert peers.describe_committed(str(tmp_path / 'none')).startswith('unknown')
