"""Four devices follow the channels: real ``python -m headpose.edge follow`` processes polling moto's
server every second, each classifying a frame every poll and reporting its health.

cam-1 and cam-2 are canaries (``canary_devices``), cam-3 and cam-4 stable devices. With A
stable and B on the canary, the canaries run B and ``rollout.tick`` (in this process, as the
DAG task calls it) promotes B once they have soaked; cam-3 and cam-4 switch to B. Then C -
an ONNX file whose metadata names an output the graph does not have: it loads, and every
inference fails - goes to the canary; ``tick`` rolls it back and the canaries return to B.
Last D, whose file is not the one its record names: the canaries refuse it and keep B,
and ``tick`` rolls it back on their failed loads.
The stable devices never run C, every switch happens after the files verified, and every
device keeps its last verified model throughout. The fleet tables go to
``test-artifacts/fleet-table.md``.

Waits are event-driven: each device's JSON lines arrive on a queue, and the test acts on
the next line (with a deadline), never on a sleep.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import pytest

from fleet_support import channel_jobs
from headpose.fleet import rollout
from headpose.fleet.decision import format_table
from headpose.planning.layout import split_s3_uri
from headpose.registry import channels
from support import ROOT, aws_env
from test_edge_client import _save, _training_pictures

pytestmark = pytest.mark.slow
BUCKET = "fleet-devices"
FOLDER = "headpose"
ROLLOUT = {"canary_devices": ["cam-1", "cam-2"], "min_canaries": 2, "soak_minutes": 0.05, "max_error_rate": 0.01,
           "max_p95_latency_ratio": 50.0}
DEVICES = ("cam-1", "cam-2", "cam-3", "cam-4")
JOBS = {name: f"deeplens-TF-headpose-2025-03-0{day}-03-00-00-000"
        for name, day in (("A", 1), ("B", 2), ("C", 3), ("D", 4))}
DEADLINE_S = 90


def _version(s3, name: str, models: dict, broken: bool = False, corrupt: bool = False) -> dict:
    """Upload one version's files (the tiny model's ONNX file) and history record; its v3 record.

    ``broken``: it loads, and every inference fails; ``corrupt``: its file is not the one its
    record names (a device refuses to load it)."""
    job = JOBS[name]
    prefix = f"s3://{BUCKET}/{FOLDER}/TFartifacts/{job}/output/"
    entry = copy.deepcopy(models["manifest"]["formats"]["onnx"])
    if broken:  # loads (the file is fine), but every inference asks for an output the graph lacks
        entry["metadata"]["outputs"][0]["name"] = "no_such_output"
    files = {}
    for file, ref in entry["files"].items():
        s3.upload_file(str(models["edge_dir"] / file), *split_s3_uri(prefix + "edge/" + file))
        # corrupt: the record names other bytes than those stored (a file changed after publishing)
        sha256 = hashlib.sha256(b"the file as published").hexdigest() if corrupt else ref["sha256"]
        files[file] = {"uri": prefix + "edge/" + file, "sha256": sha256}
    main = files[entry["metadata"]["model_file"]]
    s3.upload_file(str(models["frozen"]), *split_s3_uri(prefix + "frozen_model.pb"))
    record = {
        "version": 3, "training_job_name": job, "published_at": datetime.now(timezone.utc).isoformat(),
        "attempts": [job], "files": {"frozen_model.pb": {"uri": prefix + "frozen_model.pb",
                                                         "sha256": models["manifest"]["frozen_model"]["sha256"]}},
        "formats": {"onnx": {"uri": main["uri"], "sha256": main["sha256"], "runtime": entry["runtime"],
                             "precision": entry["precision"], "metadata": entry["metadata"], "files": files}},
        "channel_order": entry["metadata"]["preprocessing"]["channel_order"],
        "history_record_uri": f"s3://{BUCKET}/{FOLDER}/published/history/{job}.json",
    }
    s3.put_object(Bucket=BUCKET, Key=f"{FOLDER}/published/history/{job}.json", Body=json.dumps(record).encode())
    return record


def _to_canary(s3, record: dict) -> None:
    """What publish does with a rollout: the decision record, then canary.json (If-Match)."""
    current, etag = channels.ensure_channels(s3, BUCKET, FOLDER, ROLLOUT)["canary"]
    decision = channels.decision_record(f"publish-{record['training_job_name']}", "canary", "test publish",
                                        at=datetime.now(timezone.utc).isoformat(), by="publish",
                                        canary=record, stable=None, rollout=ROLLOUT)
    channels.publish_canary(s3, BUCKET, FOLDER, record, record["history_record_uri"], (current, etag), decision,
                            ROLLOUT)


class Fleet:
    """The device processes and one queue of ``(device, event line)``."""

    def __init__(self, endpoint: str, work, picture) -> None:
        env = {**os.environ, **aws_env(endpoint), "PYTHONPATH": str(ROOT / "include")}
        self.lines: queue.Queue = queue.Queue()
        self.events: dict[str, list[dict]] = {device: [] for device in DEVICES}
        self.processes = {}
        for device in DEVICES:
            self.processes[device] = subprocess.Popen(
                [sys.executable, "-m", "headpose.edge", "follow", str(picture), "--channels",
                 f"s3://{BUCKET}/{FOLDER}/published/channels/", "--device-id", device, "--format", "onnx",
                 "--interval", "1", "--infer-every-poll", "--endpoint-url", endpoint,
                 "--cache", str(work / device)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            threading.Thread(target=self._read, args=(device,), daemon=True).start()

    def _read(self, device: str) -> None:
        for line in self.processes[device].stdout:
            if line.startswith("{"):
                self.lines.put((device, json.loads(line)))

    def until(self, done, deadline: float) -> None:
        """Take event lines until ``done(device, line)`` says so (or fail at the deadline)."""
        while True:
            try:
                device, line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the fleet did not get there in time; events: {self.summary()}")
            if "event" in line:
                self.events[device].append(line)
            if done(device, line):
                return

    def running(self, device: str) -> str | None:
        loads = [e["training_job_name"] for e in self.events[device] if e["event"] in ("loaded", "switched")]
        return loads[-1] if loads else None

    def summary(self) -> dict:
        return {d: [(e["event"], e["training_job_name"][-17:-13]) for e in ev if e["event"] != "unchanged"]
                for d, ev in self.events.items()}

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            process.wait(timeout=10)


def _tick_until(fleet: Fleet, s3, action: str, deadline: float) -> dict:
    """``rollout.tick`` after each canary event until it applies ``action``."""
    found: dict = {}

    def done(device: str, line: dict) -> bool:
        if device not in ROLLOUT["canary_devices"]:
            return False
        result = rollout.tick(s3, bucket=BUCKET, folder=FOLDER, rollout=ROLLOUT, log=lambda _: None)
        assert result["action"] in ("none", action), result["reason"]
        found.update(result)
        return result["applied"]

    fleet.until(done, deadline)
    return found


def test_a_canary_is_promoted_or_rolled_back_from_the_devices_reports(s3_client, s3_endpoint, tiny_edge_models,
                                                                        tmp_path):
    s3 = s3_client
    s3.create_bucket(Bucket=BUCKET)
    a, b = _version(s3, "A", tiny_edge_models), _version(s3, "B", tiny_edge_models)
    _to_canary(s3, a)
    rollout.act_by_hand(s3, bucket=BUCKET, folder=FOLDER, action="promote", by="setup", comment="",
                        expected_canary=a["training_job_name"], mirror=True, rollout=ROLLOUT)
    _to_canary(s3, b)
    picture = _save(_training_pictures(1), tmp_path)[0]
    fleet = Fleet(s3_endpoint, tmp_path / "caches", picture)
    tables = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        fleet.until(lambda d, l: all(fleet.running(x) for x in DEVICES), deadline)
        assert {d: fleet.running(d) for d in DEVICES} == {
            "cam-1": b["training_job_name"], "cam-2": b["training_job_name"],
            "cam-3": a["training_job_name"], "cam-4": a["training_job_name"]}

        promoted = _tick_until(fleet, s3, "promote", deadline)
        tables.append(("1. B on the canaries, promoted", promoted))
        assert channel_jobs(s3, BUCKET) == {"canary": b["training_job_name"], "stable": b["training_job_name"],
                                            "latest": b["training_job_name"]}
        fleet.until(lambda d, l: all(fleet.running(x) == b["training_job_name"] for x in DEVICES), deadline)

        c = _version(s3, "C", tiny_edge_models, broken=True)
        _to_canary(s3, c)
        fleet.until(lambda d, l: all(fleet.running(x) == c["training_job_name"] for x in ("cam-1", "cam-2")),
                    deadline)
        rolled = _tick_until(fleet, s3, "rollback", deadline)
        tables.append(("2. C on the canaries (every inference fails), rolled back", rolled))
        assert "error rate 1.000" in rolled["reason"]
        assert channel_jobs(s3, BUCKET) == {"canary": b["training_job_name"], "stable": b["training_job_name"],
                                            "latest": b["training_job_name"]}
        fleet.until(lambda d, l: all(fleet.running(x) == b["training_job_name"] for x in DEVICES), deadline)

        d = _version(s3, "D", tiny_edge_models, corrupt=True)
        _to_canary(s3, d)
        refused = _tick_until(fleet, s3, "rollback", deadline)
        tables.append(("3. D on the canary (its file is not the one recorded), rolled back on failed loads", refused))
        assert refused["figures"]["inferences"] == 0 and refused["figures"]["load_failures"] >= 10, refused["reason"]
    finally:
        fleet.stop()
        _write_tables(tables, fleet)

    for device in ("cam-3", "cam-4"):  # stable devices never ran C
        assert c["training_job_name"] not in {e["training_job_name"] for e in fleet.events[device]}
        assert [e["training_job_name"] for e in fleet.events[device] if e["event"] in ("loaded", "switched")] == [
            a["training_job_name"], b["training_job_name"]]
    for device in ("cam-1", "cam-2"):
        assert [e["training_job_name"] for e in fleet.events[device] if e["event"] in ("loaded", "switched")] == [
            b["training_job_name"], c["training_job_name"], b["training_job_name"]]
    for device in DEVICES:  # a model ran throughout: never "waiting", and D refused while B kept running
        assert all(e["event"] in ("loaded", "switched", "unchanged", "kept") for e in fleet.events[device])
        kept = [e for e in fleet.events[device] if e["event"] == "kept"]
        assert all(e["training_job_name"] == b["training_job_name"] and "has sha256" in e["detail"] for e in kept)
        assert d["training_job_name"] not in {e["training_job_name"] for e in fleet.events[device]}
    assert all(any(e["event"] == "kept" for e in fleet.events[x]) for x in ("cam-1", "cam-2")), fleet.summary()
    canary = channels.read_channels(s3, BUCKET, FOLDER)["canary"]
    assert canary["training_job_name"] == b["training_job_name"]
    assert canary["rolled_back"]["from"] == d["training_job_name"]


def _write_tables(tables: list, fleet: Fleet) -> None:
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    parts = ["# Fleet table (tests/test_fleet_devices.py)", ""]
    for title, result in tables:
        parts += [f"## {title}", "", format_table(result.get("rows") or []), "",
                  f"decision: **{result.get('action')}** - {result.get('reason')}", ""]
    parts += ["## Events per device (loaded / switched / kept)", ""]
    parts += [f"- {device}: {events}" for device, events in fleet.summary().items()]
    (artifacts / "fleet-table.md").write_text("\n".join(parts) + "\n")
