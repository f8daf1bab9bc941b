"""Shared slow work that starts with the test loop and runs while the unit tests do.

Some things many tests share take minutes to make: the native stack (PostgreSQL, Redis,
moto and every Airflow service) and the batch of whole-DAG runs. Started when the first
test starts (``conftest.pytest_runtestloop``), each runs in a thread of its own - the work
itself is in other processes, so the thread only waits - while pytest runs the unit tests;
the tests that use one are ordered after those and wait for it (``result``). Each is made
once per session, and only when a selected test uses it.

Progress goes to a log file per piece of work (pytest captures this process's output
while a test runs); ``result`` prints where it is.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# A start function gets a ``say`` for its progress lines and returns the work's handle; the
# closer (if it returns one as ``(handle, close)``) runs at the end of the session.
Start = Callable[[Callable[[str], None]], Any]


@dataclass
class Work:
    name: str
    log: Path
    future: Future
    started: float = field(default_factory=time.monotonic)
    close: Callable[[], None] | None = None


class Background:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="background")
        self._work: dict[str, Work] = {}
        self._lock = threading.Lock()

    def start(self, name: str, start: Start) -> None:
        """Start ``name`` unless it is under way already."""
        with self._lock:
            if name in self._work:
                return
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = self.log_dir / f"{name}.log"
            log.write_text("")
            work = Work(name, log, Future())
            self._work[name] = work
            work.future = self._pool.submit(self._run, work, start)

    def _run(self, work: Work, start: Start) -> Any:
        lock = threading.Lock()

        def say(line: str) -> None:
            with lock, open(work.log, "a") as log:
                log.write(f"{time.strftime('%H:%M:%S')} {line}\n")

        outcome = start(say)
        if isinstance(outcome, tuple) and len(outcome) == 2 and callable(outcome[1]):
            outcome, work.close = outcome
        say(f"ready after {time.monotonic() - work.started:.0f}s")
        return outcome

    def result(self, name: str, start: Start) -> Any:
        """The work's handle: started now if nothing started it yet, waited for if still under way."""
        self.start(name, start)
        work = self._work[name]
        waited = time.monotonic()
        handle = work.future.result()
        print(f"[{name}] ready {time.monotonic() - work.started:.0f}s after its start "
              f"(waited {time.monotonic() - waited:.0f}s here); its log: {work.log}")
        return handle

    def close(self) -> None:
        """Stop what was made (the stack's processes...), after waiting for what is under way."""
        for work in self._work.values():
            try:
                work.future.result()
            except BaseException:
                pass  # its test has reported it
            if work.close:
                work.close()
        self._pool.shutdown(wait=True)
