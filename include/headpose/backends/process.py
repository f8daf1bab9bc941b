"""Supervising the training toolkit and its program on each host: streamed output, metrics, the run-time limit, stopping.

The toolkit leads its own process group, which the training program it starts (and
that program's children) share, so a stop reaches all of them; its pid is recorded in
the job's folder so that a retry can stop one a killed task left behind.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

Log = Callable[[str], None]


class MetricCollector:
    """The last value each ``MetricDefinitions`` regex matched, as SageMaker reports them."""

    def __init__(self, definitions: list[Mapping[str, str]]):
        self.patterns = [(d["Name"], re.compile(d["Regex"])) for d in definitions]
        self.values: dict[str, float] = {}

    def feed(self, line: str) -> None:
        for name, pattern in self.patterns:
            match = pattern.search(line)
            if match:
                try:
                    self.values[name] = float(match.group(1))
                except (IndexError, ValueError):
                    pass

    def final(self, when: datetime) -> list[dict[str, Any]]:
        return [{"MetricName": n, "Value": v, "Timestamp": when} for n, v in self.values.items()]

    def summary(self) -> str:
        return ", ".join(f"{n}={v:g}" for n, v in self.values.items()) or "none"


@dataclass(frozen=True)
class HostCommand:
    """One host's toolkit: its command, folder, environment and what to call once it runs."""

    host: str
    command: list[str]
    cwd: Path
    env: dict[str, str]
    on_start: Callable[[subprocess.Popen], None] | None = None


def run_hosts(
    runs: list[HostCommand], metrics: MetricCollector, log: Log, max_runtime: int,
) -> tuple[dict[str, int], bool]:
    """Run every host's command at once, each output line to ``log`` as it comes.

    Returns ``({host: exit code}, timed out)``, hosts in the order they ended. The lines
    of a job of several hosts are prefixed ``[<host>]`` (SageMaker keeps one log stream a
    host); metrics are read from the first host's, as only the chief prints them. When a
    host fails the others are stopped, as SageMaker ends a job whose host failed (they
    would wait for it in their next collective step), and after ``max_runtime`` s all are.
    """
    processes: dict[str, subprocess.Popen] = {}
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    timed_out = threading.Event()

    def stop_all() -> None:
        for process in processes.values():
            stop_process(process)

    def stop_at_limit() -> None:
        timed_out.set()
        stop_all()

    timer = threading.Timer(max_runtime, stop_at_limit)
    timer.daemon = True
    ended: dict[str, int] = {}
    try:
        for run in runs:
            processes[run.host] = process = subprocess.Popen(
                run.command, cwd=run.cwd, env=run.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, encoding="utf-8", errors="replace", bufsize=1,
                start_new_session=True,  # its own process group, so a stop reaches its children too
            )
            if run.on_start is not None:
                run.on_start(process)
            threading.Thread(target=_pump, args=(run.host, process, lines), daemon=True).start()
        timer.start()
        chief, prefixed = runs[0].host, len(runs) > 1
        while len(ended) < len(runs):
            host, line = lines.get()
            if line is None:  # its output closed: it has ended, or is about to
                ended[host] = processes[host].wait()
                if ended[host] != 0:
                    stop_all()
                continue
            log(f"[{host}] {line}" if prefixed else line)
            if host == chief:
                metrics.feed(line)
    except BaseException:
        # The task itself is being stopped (timeout, kill): do not leave training behind.
        stop_all()
        for process in processes.values():
            process.wait()
        raise
    finally:
        timer.cancel()
    return ended, timed_out.is_set()


def _pump(host: str, process: subprocess.Popen, lines: queue.Queue) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.put((host, line.rstrip("\n")))
    lines.put((host, None))


PID_FILE = "training.pid"


def recording_pid(
    root: Path, on_start: Callable[[subprocess.Popen], None] | None
) -> Callable[[subprocess.Popen], None]:
    def started(process: subprocess.Popen) -> None:
        (root / PID_FILE).write_text(str(process.pid))
        if on_start is not None:
            on_start(process)
    return started


def stop_previous_program(root: Path, log: Log) -> bool:
    """Kill the training program a previous try left running in ``root``; whether there was one.

    The program leads its own process group (so that a stop reaches its children), which
    also means it outlives a task process killed with SIGKILL (an OOM kill, a lost
    worker container): on_kill never runs then. Left alone, it would train beside the
    retry in the folder the retry is about to empty. The pid is only trusted if that
    process still works in this folder (``/proc/<pid>/cwd``), so a recycled pid is spared.
    """
    try:
        pid = int((root / PID_FILE).read_text())
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError):
        return False
    if cwd != (root / "code").resolve():
        return False
    log(f"stopping the training program {pid} that a previous try left running")
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    for _ in range(100):  # it is reaped by init; wait until /proc no longer shows it working here
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            break
        time.sleep(0.1)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM the training process and its children (it leads its own process group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
