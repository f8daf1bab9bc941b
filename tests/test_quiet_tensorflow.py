"""TensorFlow's native start-up lines leave stderr (which a worker logs as errors) for the log at INFO."""
from __future__ import annotations

import os
import subprocess
import sys

from support import ROOT


def test_start_up_lines_are_logged_not_written_to_stderr():
    probe = ("from headpose.artifacts.quiet_tensorflow import import_tensorflow\n"
             "tf = import_tensorflow(lambda line: print('LOG', line, flush=True))\n"
             "print('sum', int(tf.constant(1) + 1))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "sum 2" in done.stdout
    assert "I0000" not in done.stderr and "absl::InitializeLog" not in done.stderr, done.stderr
    assert "LOG tensorflow start-up:" in done.stdout  # the lines are kept, at the log's level
