"""Run the Triton-interpreter tests (tests/interpret/) in a child process.

TRITON_INTERPRET must be set before triton decorates a kernel, i.e. before import,
so these tests cannot share the main pytest process. One child per file keeps the
failure report readable.
"""
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
FILES = sorted(p.name for p in (HERE / "interpret").glob("test_*.py"))


@pytest.mark.skipif(not FILES, reason="no interpreter tests present")
@pytest.mark.parametrize("name", FILES)
def test_interpreted(name):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(HERE / "interpret" / name)],
        env=env, capture_output=True, text=True, cwd=HERE.parent,
    )
    if proc.returncode != 0:
        pytest.fail(f"{name} failed under TRITON_INTERPRET=1:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}")
