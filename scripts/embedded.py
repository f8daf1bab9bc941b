"""The embedded default: an S3-compatible server on loopback for runs without AWS.

moto's server speaks the real S3 (and SageMaker) HTTP APIs, so Airflow reaches it
through the ordinary ``aws_default`` connection with an ``endpoint_url``; nothing in
the pipeline knows it is not AWS. It runs as a separate process so that it can be
stopped (or killed, in fault tests) like a real endpoint going away.

A harness for the demo (``scripts/demo.py``) and the tests, so it lives beside them in
``scripts/`` rather than in the product package.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

REGION = "us-east-1"
# moto accepts any credentials; these only have to be present for botocore to sign.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "embedded", "AWS_SECRET_ACCESS_KEY": "embedded"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EmbeddedS3:
    process: subprocess.Popen
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, port: int | None = None, timeout: float = 60.0) -> "EmbeddedS3":
        port = port or free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        server = cls(process, port)
        server.wait_ready(timeout)
        return server

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.process.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"moto server on port {self.port} did not answer in {timeout}s")

    def reset(self) -> None:
        """Forget every bucket, object and job (between tests)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def environment(self) -> dict[str, str]:
        """Variables that point boto3 and Airflow's ``aws_default`` at this server."""
        connection = {"conn_type": "aws", "extra": {"endpoint_url": self.endpoint, "region_name": REGION}}
        return {
            **CREDENTIALS,
            "AWS_DEFAULT_REGION": REGION,
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection),
            # moto's training jobs are done as soon as they are created.
            "HEADPOSE_TRAINING_POLL_SECONDS": "1",
        }
