"""TensorFlow, imported with its C++ start-up messages moved from stderr to the task's log at INFO.

TensorFlow's native code writes lines such as "oneDNN custom operations are on" and
"failed call to cuInit" to file descriptor 2 before its logging is configured, so
``TF_CPP_MIN_LOG_LEVEL`` does not silence them; an Airflow worker logs whatever a task
writes to stderr as an error. The few tasks that run TensorFlow in the worker's own
process import it through here, once; the lines still reach the log, at the level they
deserve.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable

Log = Callable[[str], None]


def import_tensorflow(log: Log) -> Any:
    """The ``tensorflow`` module, imported (and its devices set up) with fd 2 captured."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    # A file, not a pipe: nothing reads while the import runs, and a full pipe would block it.
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # device set-up writes its own lines (cuInit)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        for line in captured.read().decode(errors="replace").splitlines():
            if line.strip():
                log(f"tensorflow start-up: {line.strip()}")
    return tf
