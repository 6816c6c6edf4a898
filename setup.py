"""Only ships ``jaxlm-lm_eval.pth`` (all metadata is in pyproject.toml).

lm-evaluation-harness has no plugin discovery for models: ``lm_eval --model
jaxlm`` finds only names registered in its process. The .pth file runs
``jaxlm.evals.lm_eval_plugin`` at interpreter start, which only watches for
lm_eval's registry being imported and then registers ``jaxlm`` lazily (no
jax, no lm_eval import of its own).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = 'jaxlm-lm_eval.pth'


class BuildPy(build_py):
  """Regular wheels: the .pth goes to the top of site-packages."""

  def run(self):
    super().run()
    self.copy_file(PTH, str(Path(self.build_lib) / PTH))


class EditableWheel(editable_wheel):
  """`pip install -e`: the editable wheel carries the same .pth."""

  def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
    out = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
    shutil.copy(PTH, Path(unpacked_wheel) / PTH)
    return out


setup(cmdclass={'build_py': BuildPy, 'editable_wheel': EditableWheel})
