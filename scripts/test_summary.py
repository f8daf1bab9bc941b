"""One closing line and one exit code for test.sh's two pytest sessions.

Usage: ``python scripts/test_summary.py <log> <exit code> [<log> <exit code> ...]``.
Each log ends with pytest's summary line (``=== 2 failed, 700 passed, 36 deselected in
600.00s ===``); their counts are added into ``suite: N passed, N failed, N skipped``
(errors count as failed). The exit code is the first failing session's, 0 when every
session passed, and 5 (pytest's "no tests ran") only when no session ran a test.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

SUMMARY = re.compile(r"^=+ (?P<counts>.*?) in [0-9.]+s(?: \([0-9:]+\))? =+$")
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")


def counts(log: Path) -> dict[str, int]:
    """The counts of the last pytest summary line in ``log`` (none found: nothing ran)."""
    found: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = SUMMARY.match(line.strip())
        if match:
            found = {}
            for number, word in COUNT.findall(match["counts"]):
                word = "failed" if word.startswith("error") else word
                found[word] = found.get(word, 0) + int(number)
    return found


def combined_exit_code(codes: list[int]) -> int:
    failing = [code for code in codes if code not in (0, 5)]
    if failing:
        return failing[0]
    return 5 if all(code == 5 for code in codes) else 0


def main(argv: list[str]) -> int:
    pairs = list(zip(argv[0::2], argv[1::2]))
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for log, _ in pairs:
        for word, number in counts(Path(log)).items():
            if word in totals:
                totals[word] += number
    print(f"suite: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return combined_exit_code([int(code) for _, code in pairs])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
