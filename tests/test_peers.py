"""Peer heartbeats: a silent peer, and one that leaves with a reason, end the others boundedly."""

import json
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


def test_after_a_gloo_abort_the_supervisor_names_only_the_peer_that_is_silent():
  """Process 0's child was aborted; process 1 lives on (its watch runs), process 2 is dead."""
  socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
  for s in socks:
    s.bind(('127.0.0.1', 0))
  table = [('127.0.0.1', s.getsockname()[1], f'host{i}') for i, s in enumerate(socks)]
  socks[0].close()  # the aborted child's port, free for its supervisor
  socks[2].close()
  lost = []
  alive = peers.PeerWatch(1, table, socks[1], 30, interval=0.05, on_lost=lost.append).start()
  t0 = time.monotonic()
  silent, waited = peers.find_silent(json.dumps([0, 0.1, table]))
  assert silent == ['process 2 (host host2)']
  assert 1.0 <= waited < 2.0 and time.monotonic() - t0 < 2.5
  _wait(lambda: lost, 2)  # the supervisor's goodbye ends the live peer at once
  assert lost and lost[0].startswith('process 0 (host host0) stopped: it was ended by jax')
  alive.stop()
