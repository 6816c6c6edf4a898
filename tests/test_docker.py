"""docker/ Dockerfiles pass hadolint (no Docker engine needed)."""

from pathlib import Path

import pytest

from test_launch import linter, run

DOCKERFILES = sorted((Path(__file__).resolve().parents[1] / 'docker').glob('Dockerfile.*'))


def test_dockerfiles_exist():
  assert {p.name for p in DOCKERFILES} >= {'Dockerfile.gpu', 'Dockerfile.tpu'}


@pytest.mark.parametrize('dockerfile', DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
  out = run(linter('hadolint'), str(dockerfile))
  assert out.returncode == 0, out.stdout + out.stderr
