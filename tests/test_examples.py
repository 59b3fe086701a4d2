"""The README's demo and the PEFT example run as a user runs them, and their own checks pass
(the training and decode examples take ~20 s each on a CPU; python/gpu_suite.sh runs them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("example", ["quickstart.py", "peft_model.py"])
def test_example_runs(example):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / example)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
