"""Tools for the fault tests: an S3 endpoint that goes away on cue, killing a worker, artifacts.

``CuttingProxy`` sits between Airflow and moto's server. When it sees the request it was
told to wait for (say the ``GET`` of ``model.tar.gz``), it closes every connection and
stops listening: from then on the endpoint refuses connections, exactly as a stopped
server does, at a precise moment of a precise task. Stopping moto's process itself
would do the same to Airflow but also erase moto's (in-memory) buckets, leaving nothing
to compare the published state against.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import signal
import socket
import subprocess
import tarfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import psutil


def loopback_listener() -> tuple[socket.socket, int]:
    """A listening socket on a free loopback port, and the port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener, listener.getsockname()[1]


class CuttingProxy:
    """A loopback TCP relay to ``upstream_port`` that goes away at the first request matching ``trigger``."""

    def __init__(self, upstream_port: int, trigger: str):
        self.upstream_port = upstream_port
        self.trigger = re.compile(trigger.encode(), re.MULTILINE)
        self.cut = threading.Event()
        self.relayed: list[bytes] = []  # request lines seen, for the test's messages
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener, self.port = loopback_listener()
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, inspect: bool) -> None:
        try:
            while not self.cut.is_set():
                data = source.recv(65536)
                if not data:
                    break
                if inspect:
                    self.relayed.extend(re.findall(rb"^[A-Z]+ \S+", data, re.MULTILINE))
                    if self.trigger.search(data):
                        self.go_away()
                        return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def go_away(self) -> None:
        """Stop listening and reset every open connection."""
        self.cut.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    sock.close()
                except OSError:
                    pass


# -- processes -------------------------------------------------------------------------

class StreamedRun:
    """An ``airflow dags test`` process whose output is read line by line as it comes."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with open(self.log_path, "w") as log:
            for line in self.process.stdout:
                self.lines.append(line)
                log.write(line)
                log.flush()

    def wait_for(self, pattern: str, timeout: float = 900) -> str:
        """The first output line matching ``pattern``; fails if the process ends first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                line = self.lines[seen]
                seen += 1
                if regex.search(line):
                    return line
            if self.process.poll() is not None and seen >= len(self.lines):
                self._reader.join(5)
                if seen >= len(self.lines):
                    raise AssertionError(f"process ended before {pattern!r}; see {self.log_path}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout}s; see {self.log_path}")

    def kill_worker(self) -> list[int]:
        """SIGKILL the process and every descendant at once, as when a worker's machine dies."""
        return kill_tree(self.process.pid)

    def wait(self, timeout: float = 1800) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and all its descendants (children first seen, so none escapes)."""
    victims = [*descendants(pid)]
    try:
        victims.insert(0, psutil.Process(pid))
    except psutil.NoSuchProcess:
        pass
    for process in victims:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    return [p.pid for p in victims]


def find_descendant(pid: int, needle: str, timeout: float = 600) -> psutil.Process:
    """The first descendant of ``pid`` whose command line contains ``needle``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in descendants(pid):
            try:
                if needle in " ".join(process.cmdline()):
                    return process
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no process with {needle!r} under {pid}")


# -- S3 state --------------------------------------------------------------------------

def published_state(s3: Any, bucket: str, folder: str = "headpose") -> dict[str, tuple[str, str]]:
    """``{key: (ETag, sha256 of the bytes)}`` of everything under ``published/``."""
    state = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{folder}/published/"):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            state[obj["Key"]] = (obj["ETag"], hashlib.sha256(body).hexdigest())
    return state


def keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [o["Key"] for o in page.get("Contents", [])]
    return sorted(found)


def place_training_result(s3: Any, bucket: str, job: str, artifact: bytes, folder: str = "headpose") -> str:
    """Put ``artifact`` where job ``job``'s model.tar.gz goes, with the local backend's
    completion record beside it, so that ``train`` returns it instead of training.

    This is how a hostile or prepared artifact enters the pipeline at the point where a
    training job's output would: everything from ``download_artifact`` on is real.
    """
    output = f"{folder}/TFartifacts/{job}/output"
    uri = f"s3://{bucket}/{output}/model.tar.gz"
    now = datetime.now(timezone.utc).isoformat()
    result = {
        "TrainingJobName": job,
        "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:000000000000:training-job/{job.lower()}",
        "TrainingJobStatus": "Completed",
        "SecondaryStatus": "Completed",
        "ModelArtifacts": {"S3ModelArtifacts": uri},
        "CreationTime": now, "TrainingStartTime": now, "TrainingEndTime": now, "LastModifiedTime": now,
        "SecondaryStatusTransitions": [],
        "FinalMetricDataList": [],
        "TrainingTimeInSeconds": 1,
        "BillableTimeInSeconds": 0,
        "EnableManagedSpotTraining": False,
        "LocalBackend": {"ArtifactSha256": hashlib.sha256(artifact).hexdigest(), "ExitCode": 0},
    }
    s3.put_object(Bucket=bucket, Key=f"{output}/model.tar.gz", Body=artifact)
    s3.put_object(Bucket=bucket, Key=f"{output}/local-job.json",
                  Body=json.dumps({"version": 1, "result": result}).encode())
    return uri


# -- archives --------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def tar_gz(members: Iterable[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file_member(name: str, data: bytes = b"x") -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def huge_member_tar_gz(name: str, declared: int) -> bytes:
    """A gzip tar whose one header declares ``declared`` bytes but carries none of them."""
    info = tarfile.TarInfo(name)
    info.size = declared
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    return gzip.compress(header + b"\0" * 1024)


class OwnerCheckingRelay:
    """A loopback relay to moto that checks ``x-amz-expected-bucket-owner`` the way S3 does.

    moto ignores the header; S3 answers 403 AccessDenied when it names another account
    than the bucket's owner. The relay plays that part for every request that carries it,
    and records the request lines that carried none.
    """

    def __init__(self, upstream_port: int, owner: str):
        self.upstream_port, self.owner = upstream_port, owner
        self.unpinned: list[str] = []
        self.refused: list[str] = []
        self._listener, self.port = loopback_listener()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        request_start = re.compile(rb"^(GET|PUT|POST|HEAD|DELETE) (\S+)")
        try:
            while data := client.recv(1 << 16):
                start = request_start.match(data)
                if start:
                    line = start.group(0).decode()
                    owner = re.search(rb"(?im)^x-amz-expected-bucket-owner:\s*(\S+)", data.split(b"\r\n\r\n")[0])
                    if owner is None:
                        self.unpinned.append(line)
                    elif owner.group(1).decode() != self.owner:
                        self.refused.append(line)
                        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                                b"<Message>Access Denied</Message></Error>")
                        client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
                                       b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                        break
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                target.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
