"""A TCP proxy that adds a fixed delay to every HTTP request it forwards (object-store latency).

Real buckets answer in tens of milliseconds; the emulator on localhost in well
under one. Put this in front of it (STORAGE_EMULATOR_HOST=proxy.url) to see
whether a reader keeps up at real latencies:

    python tests/cloud/delay_proxy.py 127.0.0.1:4443 0.05   # prints its own URL

A chunk from the client that starts with an HTTP method starts a request and
waits `delay` seconds before it is forwarded; body chunks and answers pass
straight through, so each request pays the delay once.
"""

import asyncio
import socket
import subprocess
import sys

_METHODS = (b'GET ', b'PUT ', b'POST', b'HEAD', b'DELE', b'PATC')


async def _pipe(reader, writer, delay: float) -> None:
  try:
    while True:
      chunk = await reader.read(1 << 16)
      if not chunk:
        break
      if delay and chunk.startswith(_METHODS):
        await asyncio.sleep(delay)
      writer.write(chunk)
      await writer.drain()
  except (ConnectionError, asyncio.CancelledError):
    pass
  finally:
    writer.close()


async def _serve(target_host: str, target_port: int, delay: float, sock: socket.socket):
  async def handle(client_r, client_w):
    try:
      up_r, up_w = await asyncio.open_connection(target_host, target_port)
    except OSError:
      client_w.close()
      return
    await asyncio.gather(_pipe(client_r, up_w, delay), _pipe(up_r, client_w, 0.0))

  server = await asyncio.start_server(handle, sock=sock, backlog=512)
  async with server:
    await server.serve_forever()


class DelayProxy:
  """The proxy in a subprocess of its own (its event loop never competes with the test's)."""

  def __init__(self, target_url: str, delay: float):
    hostport = target_url.split('://', 1)[-1]
    self.proc = subprocess.Popen([sys.executable, __file__, hostport, str(delay)],
                                 stdout=subprocess.PIPE, text=True)
    self.url = self.proc.stdout.readline().strip()
    if not self.url:
      raise RuntimeError('delay proxy did not start')

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      self.proc.wait(10)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def main(argv) -> None:
  host, port = argv[0].rsplit(':', 1)
  delay = float(argv[1])
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  print(f'http://127.0.0.1:{sock.getsockname()[1]}', flush=True)
  asyncio.run(_serve(host, int(port), delay, sock))


if __name__ == '__main__':
  main(sys.argv[1:])
