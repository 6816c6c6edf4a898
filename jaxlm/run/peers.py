"""Peer liveness for multi-host runs: a lost or stuck process ends every process, boundedly.

On a pod nothing kills the survivors when one host dies: they wait inside a
collective until jax.distributed's own heartbeat (100 s by default) aborts them
with SIGABRT and a C++ stack trace, and a process that hangs while its
heartbeat thread lives is never noticed at all. Here every process sends a
small UDP datagram to every other one each ``interval`` seconds from a daemon
thread (it runs while the main thread waits in a collective) and watches what
it receives:

  * a peer silent for ``timeout`` seconds (killed, its host gone, including the
    coordinator, process 0) ends this process with exit 75 (EX_TEMPFAIL) and one
    line naming the peer, how long it was silent, the last committed checkpoint
    and "rerun every process to resume";
  * a peer that ends on its own (its hang watchdog fired, an error) says so in a
    last datagram ("bye"), and the others end at once with a line naming it;
  * a peer that finished normally says so too, and its silence is then expected.

Addresses are exchanged once at start with one all-gather (every process is
alive then). The thread sends nothing a firewall between hosts of one pod would
not already pass for jax's own traffic (UDP on an ephemeral port, or
``JAXLM_PEER_PORT``).
"""

import atexit
import faulthandler
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from jaxlm.core.errors import EXIT_PREEMPTED

log = logging.getLogger('jaxlm')
_HOST_BYTES = 64  # hostname bytes exchanged per process (longer names are cut)
_watch = None  # the process's PeerWatch, if any: exit() tells the peers why we leave


STATUS_FD = 'JAXLM_STATUS_FD'  # set by jaxlm.run.supervise in its child: 'committed <checkpoint dir>'
_checkpoints = ''  # the run's checkpoint directory, once the train loop has opened it


def watch_checkpoints(directory: str) -> None:
  """Names ``directory``'s last committed step in a fault's exit line (here and in the parent)."""
  global _checkpoints
  _checkpoints = directory
  _report(f'committed {directory}')


def _report(line: str) -> None:
  """One line to jaxlm.run.supervise's status pipe: it names what we knew if we abort."""
  fd = os.environ.get(STATUS_FD)
  if fd:
    try:
      os.write(int(fd), f'{line}\n'.encode())
    except OSError:
      pass


def describe_committed(directory: str | None = None) -> str:
  """'step 10 in DIR' for the newest step Orbax has committed in DIR (listed now)."""
  directory = directory or _checkpoints
  if not directory:
    return 'none yet (the run had not opened its checkpoints)'
  from jaxlm.core import storage  # noqa: PLC0415
  try:
    root = storage.path(directory)
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
    # On object stores Orbax writes in place and marks a step done with commit_success.txt.
    remote = storage.is_remote(directory)
    step = next((s for s in steps if not remote or (root / str(s) / 'commit_success.txt').exists()),
                None)
  except Exception as e:  # noqa: BLE001  (the line must be printed whatever the storage does)
    return f'unknown ({directory} unreadable: {type(e).__name__})'
  return f'step {step} in {directory}' if step is not None else f'none in {directory}'


class PeerWatch:
  """Heartbeats to and from every other process over UDP; calls ``on_lost(line)`` once."""

  def __init__(self, process_id: int, peers: list[tuple[str, int, str]], sock: socket.socket,
               timeout: float, interval: float | None = None, on_lost=None):
    self.process_id = process_id
    self.peers = peers  # (ip, port, hostname) by process index; ours included
    self.sock = sock
    self.timeout = timeout
    self.interval = interval or max(0.2, min(2.0, timeout / 10))
    self.on_lost = on_lost or _exit_with
    start = time.monotonic()
    self.last_seen = {i: start for i in range(len(peers)) if i != process_id}
    self.finished: set[int] = set()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='jaxlm-peers', daemon=True)

  def start(self) -> 'PeerWatch':
    self._thread.start()
    return self

  def _send(self, message: str) -> None:
    data = message.encode()[:1400]
    for i, (ip, port, _) in enumerate(self.peers):
      if i != self.process_id:
        try:
          self.sock.sendto(data, (ip, port))
        except OSError:
          pass  # an unreachable peer shows as silence

  def _name(self, i: int) -> str:
    return f'process {i} (host {self.peers[i][2]})'

  def _run(self) -> None:
    next_beat = 0.0
    while not self._stop.is_set():
      now = time.monotonic()
      if now >= next_beat:
        self._send(f'hb {self.process_id}')
        next_beat = now + self.interval
      self.sock.settimeout(max(0.01, next_beat - time.monotonic()))
      try:
        data, _ = self.sock.recvfrom(2048)
      except (TimeoutError, socket.timeout):
        data = b''
      except OSError:
        return  # closed by stop()
      if data:
        line = self._receive(data.decode(errors='replace'))
        if line:
          return self._lost(line)
      now = time.monotonic()
      for i, seen in self.last_seen.items():
        if i not in self.finished and now - seen > self.timeout:
          return self._lost(f'{self._name(i)} stopped responding: no heartbeat for '
                            f'{now - seen:.0f} s (--peer_timeout={self.timeout:g})')

  def _receive(self, text: str) -> str | None:
    kind, _, rest = text.partition(' ')
    sender, _, reason = rest.partition(' ')
    try:
      i = int(sender)
    except ValueError:
      return None
    if i not in self.last_seen:
      return None
    self.last_seen[i] = time.monotonic()
    if kind == 'done':
      self.finished.add(i)
    elif kind == 'bye':
      if 'did not finish' in reason:
        # A peer's hang watchdog fired: this process may be the stuck one (the two
        # timers race), so its stacks belong in its log too.
        sys.stderr.write(f'jaxlm: {self._name(i)} reports a hang; the stacks of this '
                         "process's threads:\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
      return f'{self._name(i)} stopped: {reason}'
    return None

  def _lost(self, line: str) -> None:
    self._send(f'bye {self.process_id} it lost a peer ({line})')
    self.on_lost(line)

  def leave(self, reason: str = '') -> None:
    """Tells the peers we are going: 'done' (expected) or 'bye <reason>' (they end too)."""
    self._send(f'bye {self.process_id} {reason}' if reason else f'done {self.process_id}')
    self._stop.set()

  def stop(self) -> None:
    self._stop.set()
    self.sock.close()


def _exit_with(line: str) -> None:
  """Ends the process now with exit 75 and one line (called from a watchdog thread)."""
  sys.stderr.write(f'jaxlm: error: {line}; last committed checkpoint: {describe_committed()}; '
                   'rerun every process to resume\n')
  sys.stderr.flush()
  os._exit(EXIT_PREEMPTED)  # the main thread may be blocked in a collective: no unwinding


_finished = False


def finished() -> None:
  """Marks this process's run as ended normally (done or stopped with a checkpoint)."""
  global _finished
  _finished = True


def exit_now(reason: str) -> None:
  """Ends this process with exit 75 after telling the peers ``reason`` (they end too)."""
  if _watch is not None:
    _watch.leave(reason)
  _exit_with(reason)


_LOST_PEER = re.compile(r'Gloo|Connection (closed|reset)|coordination service|DEADLINE_EXCEEDED|'
                        r'UNAVAILABLE|heartbeat', re.I)


def collective_failed(exc: BaseException) -> None:
  """Called with an unexpected error of a multi-process run; returns if it is not a lost peer.

  A collective whose peer died raises in the main thread (gloo: 'Connection
  closed by peer') about when the watch thread learns why; the thread's line
  (naming the peer) is the one to print, so wait for it, then say what failed.
  """
  if _watch is None or not _LOST_PEER.search(str(exc)):
    return
  deadline = time.monotonic() + _watch.timeout + 2 * _watch.interval
  while time.monotonic() < deadline:
    time.sleep(0.1)  # the watch thread ends the process from here
  first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
  exit_now(f'a collective with the other processes failed ({first[:300]})')


def find_silent(report: str) -> tuple[list[str], float]:
  """Which peers are gone, learnt after this process's child was aborted by jax/gloo.

  ``report`` is what the child's PeerWatch put on the status pipe (see start()).
  gloo aborts a survivor milliseconds after a peer's socket closes, long before
  the watch could tell the dead peer from a slow one, so the supervisor takes
  over the child's port for a few heartbeat intervals: peers still alive (or
  whose supervisors do the same) are heard, the others are named. Then it says
  'bye' so live peers end at once instead of waiting for their timeout.
  """
  me, interval, peers = json.loads(report)
  others = {i for i in range(len(peers)) if i != me}
  heard: set[int] = set()
  window = 3 * interval + 1.0
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      sock.bind(('0.0.0.0', peers[me][1]))
    except OSError:
      return [], 0.0
    watch = PeerWatch(me, peers, sock, window, interval, on_lost=lambda line: None)
    end, next_beat = time.monotonic() + window, 0.0
    while time.monotonic() < end and heard != others:
      if time.monotonic() >= next_beat:
        watch._send(f'hb {me}')
        next_beat = time.monotonic() + interval
      sock.settimeout(max(0.01, min(end, next_beat) - time.monotonic()))
      try:
        data, _ = sock.recvfrom(2048)
      except (TimeoutError, socket.timeout):
        continue
      sender = data.decode(errors='replace').split(' ')[1:2]
      if sender and sender[0].isdigit() and int(sender[0]) in others:
        heard.add(int(sender[0]))
    watch._send(f'bye {me} it was ended by jax.distributed/gloo after losing a peer')
  return [watch._name(i) for i in sorted(others - heard)], window


def _own_ip(coordinator: str) -> str:
  """The address peers reach this host at: the one that routes to the coordinator."""
  host = coordinator.rsplit(':', 1)[0].strip('[]') if coordinator else ''
  if host:
    try:
      with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))  # no packet is sent
        return s.getsockname()[0]
    except OSError:
      pass
  try:
    return socket.gethostbyname(socket.gethostname())
  except OSError:
    return '127.0.0.1'


def start(timeout: float, coordinator: str = '') -> PeerWatch | None:
  """Starts watching the other processes (after jax.distributed.initialize); None if alone.

  Collective: every process must call it (one all-gather of the addresses).
  """
  global _watch
  import jax  # noqa: PLC0415  (the pure parts above need no jax)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  if jax.process_count() == 1 or timeout <= 0:
    return None
  sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
  sock.bind(('0.0.0.0', int(os.environ.get('JAXLM_PEER_PORT', '0') or 0)))
  ip = _own_ip(coordinator)
  name = socket.gethostname().encode()[:_HOST_BYTES]
  row = np.zeros(6 + _HOST_BYTES, np.int32)
  row[:4] = [int(x) for x in ip.split('.')]
  row[4] = sock.getsockname()[1]
  row[5] = len(name)
  row[6:6 + len(name)] = list(name)
  rows = np.asarray(multihost_utils.process_allgather(row))
  peers = [('.'.join(str(int(x)) for x in r[:4]), int(r[4]),
            bytes(int(b) for b in r[6:6 + int(r[5])]).decode(errors='replace')) for r in rows]
  _watch = PeerWatch(jax.process_index(), peers, sock, timeout).start()
  _report(f'peers {json.dumps([_watch.process_id, _watch.interval, peers])}')
  # Leaving without finished() (an error line, a crash) ends the peers too: they would wait
  # for us in the next collective.
  atexit.register(lambda: _watch.leave('' if _finished else 'it exited before finishing'))
  log.info('peers: watching %d other processes (--peer_timeout=%g s)', len(peers) - 1, timeout)
  return _watch
