"""scripts/test.sh's closing line and exit code for its two pytest sessions (scripts/test_summary.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from support import ROOT

SUMMARY = ROOT / "scripts" / "test_summary.py"


def _run(tmp_path, *sessions: tuple[str, int]) -> tuple[str, int]:
    argv = []
    for i, (text, code) in enumerate(sessions):
        log = tmp_path / f"session-{i}.log"
        log.write_text(text)
        argv += [str(log), str(code)]
    done = subprocess.run([sys.executable, str(SUMMARY), *argv], capture_output=True, text=True, timeout=60)
    return done.stdout.strip(), done.returncode


MAIN = ("tests/test_a.py::test_x PASSED\n"
        "======= 1 failed, 700 passed, 3 skipped, 10 deselected, 2 warnings in 612.31s (0:10:12) =======\n")
STACK = "======================= 12 passed, 1 error, 700 deselected in 500.02s (0:08:20) =======================\n"
NOTHING = "=================== 712 deselected in 3.10s ===================\n"


@pytest.mark.parametrize("sessions, line, code", [
    ([(MAIN, 1), (STACK, 1)], "suite: 712 passed, 2 failed, 3 skipped", 1),
    ([(MAIN.replace("1 failed, ", ""), 0), (STACK.replace(", 1 error", ""), 0)],
     "suite: 712 passed, 0 failed, 3 skipped", 0),
    ([(MAIN.replace("1 failed, ", ""), 0), (NOTHING, 5)], "suite: 700 passed, 0 failed, 3 skipped", 0),
    ([(NOTHING, 5), (NOTHING, 5)], "suite: 0 passed, 0 failed, 0 skipped", 5),
    ([(MAIN.replace("1 failed, ", ""), 0), ("Traceback (most recent call last):\n", 3)],
     "suite: 700 passed, 0 failed, 3 skipped", 3),  # a session that broke counts as failed
])
def test_one_line_counts_both_sessions_and_the_exit_code_is_the_failing_ones(tmp_path, sessions, line, code):
    assert _run(tmp_path, *sessions) == (line, code)
