"""Runs one process of a multi-host ``jaxlm train`` as a child, so its C++ aborts end in one line.

jax.distributed's client aborts its process (SIGABRT after a glog "F..."
line and a ~20-line "Check failure stack trace") the moment the coordination
service is gone, e.g. when process 0's host dies, and gloo does the same
(``std::terminate``) when a peer's socket closes mid-collective. No Python code
runs in such a process any more, so this parent does what it cannot:

  * passes the child's stderr through, except the glog/C++ lines that precede
    an abort, held back a few seconds and dropped when the abort follows
    (``JAXLM_DEBUG=1`` passes everything);
  * turns an abort that says a peer or the coordinator was lost into exit 75
    (EX_TEMPFAIL, like a preemption: rerun every process to resume) with one
    ``jaxlm: error:`` line naming what jax reported and the last committed
    checkpoint (the child reports it on a status pipe as it commits);
  * forwards SIGTERM/SIGINT to the child (which saves and exits 75), and the
    child dies with it if this process is killed (PR_SET_PDEATHSIG).

Any other death by a signal keeps its code and its output: that is a crash.
"""

import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time

from jaxlm.core.errors import EXIT_PREEMPTED
from jaxlm.run import peers
from jaxlm.run.peers import STATUS_FD

ENV_FLAG = 'JAXLM_SUPERVISED'  # set in the child: it runs the command itself
HOLD_S = 5.0  # how long glog/C++ lines are held back before they are shown anyway
# Lines of jax's, absl's and glog's C++ logging: 'F1204 01:54:34.806885  10497 client.h:80] ...',
# '    @     0x7feb...  tsl::...', '*** Check failure stack trace: ***', grpc continuation lines.
_NATIVE = re.compile(r'^([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]|\s+@\s+0x|\*\*\* |'
                     r'Additional GRPC error|:UNKNOWN:|terminate called|\s+what\(\):)')
_LOST = re.compile(r'distributed service detected fatal errors|coordination service|'
                   r'[Gg]loo|Connection (closed|reset) by peer|heartbeat')


def wanted() -> bool:
  return not os.environ.get(ENV_FLAG) and os.name == 'posix'


def _die_with_parent() -> None:
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed parent takes the child along


def run(argv: list[str]) -> int:
  """Runs ``python -m jaxlm argv`` as a child; returns the exit code to use."""
  read_status, write_status = os.pipe()
  env = {**os.environ, ENV_FLAG: '1', STATUS_FD: str(write_status)}
  debug = bool(os.environ.get('JAXLM_DEBUG'))
  child = subprocess.Popen([sys.executable, '-m', 'jaxlm', *argv], env=env, stderr=subprocess.PIPE,
                           pass_fds=(write_status,), start_new_session=True,
                           preexec_fn=_die_with_parent if sys.platform == 'linux' else None)
  os.close(write_status)
  # The child has its own session (a terminal's Ctrl-C reaches only us): forward once.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, _: child.send_signal(s))
  held: list[tuple[float, bytes]] = []
  directory = peer_report = None
  err, status = child.stderr.fileno(), read_status
  buf = {err: b'', status: b''}
  out = sys.stderr.buffer
  open_fds = [err, status]
  while open_fds:
    ready, _, _ = select.select(open_fds, [], [], 1.0)
    for fd in ready:
      chunk = os.read(fd, 65536)
      if not chunk:
        open_fds.remove(fd)
        continue
      buf[fd] += chunk
      *lines, buf[fd] = re.split(rb'(?<=[\n\r])', buf[fd])
      for line in lines:
        if fd == status:
          text = line.decode(errors='replace').strip()
          if text.startswith('committed '):
            directory = text[len('committed '):]
          elif text.startswith('peers '):
            peer_report = text[len('peers '):]
        elif not debug and (_NATIVE.match(line.decode(errors='replace')) or
                            (held and line.startswith((b' ', b'\t')))):
          held.append((time.monotonic(), line))
        else:
          out.write(b''.join(l for _, l in held) + line)
          held.clear()
    if held and time.monotonic() - held[0][0] > HOLD_S:
      out.write(b''.join(l for _, l in held))
      held.clear()
    out.flush()
  code = child.wait()
  native = b''.join(l for _, l in held) + buf[err]
  text = native.decode(errors='replace')
  if code < 0 and _LOST.search(text):
    fatal = next((l for l in text.splitlines()
                  if l.startswith(('F', 'terminate', '  what')) and _LOST.search(l)), '')
    committed = peers.describe_committed(directory)
    why = re.sub(r'^[IWEF]\d{4} \S+\s+\d+ \S+\] ', '', fatal).strip()
    why = why.split('. ')[0][:240] or 'aborted'  # jax's advice after it does not apply
    silent, waited = peers.find_silent(peer_report) if peer_report else ([], 0.0)
    if silent:
      lost = (f"{', '.join(silent)} stopped responding: no heartbeat for {waited:.0f} s after "
              f'jax.distributed/gloo ended this process (pid {child.pid}): {why}')
    else:
      lost = (f'this process (pid {child.pid}) was ended by jax.distributed/gloo after losing '
              f'another process or the coordinator (process 0): {why}')
    print(f'jaxlm: error: {lost}; last committed checkpoint: {committed}; '
          'rerun every process to resume', file=sys.stderr)
    return EXIT_PREEMPTED
  out.write(native)
  out.flush()
  return code if code >= 0 else 128 - code

