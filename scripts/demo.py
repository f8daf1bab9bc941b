"""Driver of scripts/demo.sh: one real DAG run against an embedded S3 server.

Kept out of ``include/`` because it is a developer convenience around the product
(start a server, call the Airflow CLI, fetch the result), not part of the pipeline.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3

from embedded import EmbeddedS3
from headpose.planning.handoff import download_verified
from headpose.registry.pointer import mirror_files

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "demo-output"
BUCKET = "headpose-demo"
# The built-in defaults are this demo (a small ResNet on the synthetic set, a few minutes
# on 2 CPU cores, 0.92-0.93 held out); the demo only names its own bucket.
DEMO_CONF = {"s3_bucket": BUCKET}


def parse_overrides(argv: list[str]) -> dict:
    conf = dict(DEMO_CONF)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"demo: arguments are key=value trigger params, got {item!r}")
        try:
            conf[key] = json.loads(value)
        except json.JSONDecodeError:
            conf[key] = value
    return conf


def run(command: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run(command, env=env, check=True)
    return time.monotonic() - started


def fetch_published(s3, folder: str) -> dict:
    pointer = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{folder}/published/latest.json")["Body"].read())
    OUTPUT.mkdir(exist_ok=True)
    # Every file the pointer names, checked against its sha256 (what a device should do).
    for name, entry in mirror_files(pointer).items():
        download_verified(s3, entry["uri"], OUTPUT / name, entry["sha256"])
    (OUTPUT / "latest.json").write_text(json.dumps(pointer, indent=2))
    return pointer


def main(argv: list[str]) -> int:
    conf = parse_overrides(argv)
    timings = {"install_s": float(os.environ.get("HEADPOSE_INSTALL_SECONDS", "0"))}
    started = time.monotonic()
    server = EmbeddedS3.start()
    try:
        env = {**os.environ, **server.environment()}
        s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                          aws_access_key_id="embedded", aws_secret_access_key="embedded")
        s3.create_bucket(Bucket=BUCKET)
        shutil.rmtree(Path(env["AIRFLOW_HOME"]), ignore_errors=True)
        print(f"demo: embedded S3 on {server.endpoint}, Airflow home {env['AIRFLOW_HOME']}", flush=True)
        run([sys.executable, "-m", "airflow", "db", "migrate"], env)
        timings["environment_start_s"] = time.monotonic() - started
        print(f"demo: running headpose_retraining with {json.dumps(conf)}", flush=True)
        timings["dag_run_s"] = run(
            [sys.executable, "-m", "airflow", "dags", "test", "headpose_retraining", "-c", json.dumps(conf)], env)
        pointer = fetch_published(s3, conf.get("headpose_folder", "headpose"))
    finally:
        server.stop()
    timings["total_s"] = time.monotonic() - started + timings["install_s"]
    (OUTPUT / "timings.json").write_text(json.dumps(timings, indent=2))
    print("\n=== headpose demo finished ===")
    print(f"training job:        {pointer['training_job_name']}")
    print(f"held-out accuracy:   {pointer['metrics']['accuracy']:.4f}")
    print(f"published (S3):      {pointer['files']['frozen_model.pb']['uri']}")
    print(f"edge formats:        {', '.join(sorted(pointer.get('formats') or {})) or 'none'}")
    print(f"frozen model (here): {OUTPUT / 'frozen_model.pb'}")
    print(f"report (here):       {OUTPUT / 'report.json'}")
    print(f"timings:             {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
