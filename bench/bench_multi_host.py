"""Two local hosts against one: what the multi-host path costs on the machine it runs on.

Both runs train the same images through the local backend (the SageMaker training
toolkit, the real entry point, the embedded S3): one host on one device for
``--steps`` steps of ``--batch`` images, and two hosts (``MultiWorkerMirroredStrategy``,
one device each) for half as many steps of the global batch. On one machine both hosts
share its cores, so the work per image is the same and the best the two-host run can do
is a ratio of 1.0; what it adds is the all-reduce of every step over loopback gRPC and a
second TensorFlow runtime. GPU scaling cannot be measured here (no GPU that TensorFlow can
use); on SageMaker the same figure is the ratio of ``images_per_sec`` in the progress lines
of a one-instance and an N-instance job.

Figures, each the median of per-pair ratios (pairs alternate which layout runs first):
``loop_seconds_ratio`` (the entry point's ``training loop returned after`` line of the
chief), ``images_per_second_ratio`` (its last progress line) and ``job_seconds_ratio``
(the whole job: start-up, download, both runtimes, evaluation, export, upload).

Usage: ``python bench/bench_multi_host.py [--pairs 3] [--steps 200] [--batch 64]``
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "include"), str(ROOT / "scripts"), str(Path(__file__).resolve().parent)]

from _common import emit, progress, ratio_of_pairs, spread, versions  # noqa: E402

BUCKET = "bench-multi-host"


def run_job(s3, work: Path, name: str, hosts: int, args, sourcedir: Path, sha256: str) -> dict:
    from headpose.backends.local import run_local_training_job
    from headpose.planning.layout import RunLayout, split_s3_uri
    from headpose.planning.request import training_job_request
    from headpose.planning.rules import validate_run_params

    params = validate_run_params({
        "s3_bucket": BUCKET, "instance_count": hosts, "training_steps": args.steps, "batch_size": args.batch,
        "resnet_size": 10, "base_filters": 8, "evaluation_steps": 1, "synthetic_train_per_pose": 12,
        "images_per_shard": 500,
    })
    job = f"bench-multi-host-{name}"
    layout = RunLayout.for_run(BUCKET, "headpose", job, f"s3://{BUCKET}/headpose/datasets/bench/")
    s3.upload_file(str(sourcedir), BUCKET, split_s3_uri(layout.sourcedir_uri)[1])
    request = training_job_request(layout, params, "local", region="us-east-1")
    lines: list[str] = []
    started = time.perf_counter()
    run_local_training_job(request, s3, work / name, lines.append, sourcedir_sha256=sha256)
    seconds = time.perf_counter() - started
    text = "\n".join(lines)
    loop = float(re.findall(r"training loop returned after ([0-9.]+) s", text)[0])
    rate = float(re.findall(r"images_per_sec=([0-9.]+)", text)[-1])
    return {"job_seconds": seconds, "loop_seconds": loop, "images_per_second": rate}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="steps of --batch images, as on one device")
    parser.add_argument("--batch", type=int, default=64, help="images per step of one device")
    args = parser.parse_args()

    import boto3

    from embedded import EmbeddedS3
    from headpose.backends.sourcedir import build_sourcedir
    from headpose.datasets.synthetic import write_synthetic_dataset

    server = EmbeddedS3.start()
    try:
        s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory(prefix="bench-multi-host-") as scratch:
            work = Path(scratch)
            write_synthetic_dataset(work / "data", train_per_pose=12, eval_per_pose=1, images_per_shard=500)
            for path in sorted((work / "data").iterdir()):
                s3.upload_file(str(path), BUCKET, f"headpose/datasets/bench/{path.name}")
            sourcedir, sha256 = build_sourcedir(work / "sourcedir.tar.gz")
            runs: dict[int, list[dict]] = {1: [], 2: []}
            for pair in range(args.pairs):
                for hosts in ((1, 2) if pair % 2 == 0 else (2, 1)):
                    progress(f"pair {pair + 1}/{args.pairs}: {hosts} host(s)")
                    runs[hosts].append(run_job(s3, work, f"{pair}-{hosts}", hosts, args, sourcedir, sha256))
                    progress(f"  {runs[hosts][-1]}")
    finally:
        server.stop()

    def ratio(key: str) -> dict:
        return ratio_of_pairs([r[key] for r in runs[2]], [r[key] for r in runs[1]])

    emit({
        "benchmark": "multi_host",
        "what": "two local hosts (MultiWorkerMirroredStrategy, one CPU device each) over one host, "
                "the same images; ratios of the two-host run over the one-host run",
        "settings": {"steps_one_device": args.steps, "batch_per_replica": args.batch, "resnet_size": 10,
                     "base_filters": 8, "train_images": 12 * 93, "shards": 3},
        "loop_seconds_ratio": ratio("loop_seconds"),
        "images_per_second_ratio": ratio("images_per_second"),
        "job_seconds_ratio": ratio("job_seconds"),
        "one_host": {key: spread([r[key] for r in runs[1]]) for key in runs[1][0]},
        "two_hosts": {key: spread([r[key] for r in runs[2]]) for key in runs[2][0]},
        "gpu_scaling": "not measured: no GPU that TensorFlow can use is reachable from here",
        "versions": versions("tensorflow", "keras", "sagemaker-training"),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
