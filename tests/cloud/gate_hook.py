"""A train-loop hook that parks a run at step 15 until the test opens a gate (file).

``--config.eval.hooks=gate_hook:wait_at_gate`` with ``JAXLM_TEST_GATE=/path``:
at step 15 (between checkpoints, whatever the loop's order of
saving and hooks) it creates ``/path.reached`` and waits until ``/path`` exists, so a
test can act while the run is provably alive, with checkpoint 10 committed and 20 not begun.
"""

import os
import time
from pathlib import Path


def wait_at_gate(ctx):
  gate = os.environ.get('JAXLM_TEST_GATE')
  if gate and ctx.step == 15:
    Path(gate + '.reached').touch()
    while not os.path.exists(gate):
      time.sleep(0.2)
