"""Command line of the edge client: ``python -m headpose.edge predict|follow ...``.

Each prediction is one JSON line on stdout (class, the tutorial Lambda's label, every
class's probability); each ``follow`` event is one JSON line too. Any error is one line
``error: ...`` on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from headpose.edge.channels import DEVICE_ID_PATTERN, is_valid_device_id, published_prefix_of
from headpose.edge.client import Follower, FollowEvent, LoadedModel, default_fetch, follow, load_model, read_record
from headpose.edge.errors import EdgeClientError
from headpose.edge.reporting import Reporter, status_record
from headpose.edge.runtimes import RUNTIMES

POINTER_ENV = "HEADPOSE_EDGE_POINTER"
CACHE_ENV = "HEADPOSE_EDGE_CACHE"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m headpose.edge",
        description="Run the published head-pose model on images with an edge runtime "
                    "(OpenVINO, ONNX Runtime or LiteRT); no TensorFlow needed.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify images with the published model")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    watch = commands.add_parser("follow", help="poll the pointer and switch to each new verified "
                                               "model; classify IMAGEs after every switch")
    watch.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    watch.add_argument("--interval", type=float, default=60.0, help="seconds between polls (default 60)")
    watch.add_argument("--max-polls", type=int, default=None, help="stop after this many polls (default: never)")
    watch.add_argument("--channels", default=None, metavar="PREFIX",
                       help="follow a channel instead of --pointer: s3://bucket/headpose/published/channels/ "
                            "(canary.json when its rollout makes this device a canary, else stable.json)")
    watch.add_argument("--device-id", default=None, help="this device's id (its AWS IoT thing name); "
                                                          "needed with --channels")
    watch.add_argument("--report", default=None, metavar="URI",
                       help="where this device writes its status each poll (default with --channels: "
                            "s3://bucket/headpose/devices/<device id>/status.json)")
    watch.add_argument("--infer-every-poll", action="store_true",
                       help="classify the IMAGEs every poll, not only after a switch (a camera's frames)")
    for command in (predict, watch):
        command.add_argument("--pointer", default=None if command is watch else os.environ.get(POINTER_ENV),
                             help="s3://bucket/headpose/published/latest.json or a local latest.json "
                                  f"(default: ${POINTER_ENV})")
        command.add_argument("--format", dest="format_name", default=None,
                             help="edge format to run, e.g. openvino_fp32, onnx, openvino_int8, onnx_int8 "
                                  "(default: the first published one whose runtime is installed)")
        command.add_argument("--cache", type=Path,
                             default=Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "headpose-edge")),
                             help=f"where verified model files are kept (default: ${CACHE_ENV} or "
                                  "~/.cache/headpose-edge)")
        command.add_argument("--endpoint-url", default=None,
                             help="S3 endpoint (MinIO, a local S3); default: boto3's ($AWS_ENDPOINT_URL)")
        command.add_argument("--threads", type=int, default=None,
                             help="runtime threads (default: 1 for ONNX Runtime and LiteRT, "
                                  "OpenVINO's own choice)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "follow" and not args.channels:
            args.pointer = args.pointer or os.environ.get(POINTER_ENV)
        if not args.pointer and not (args.command == "follow" and args.channels):
            raise EdgeClientError(f"no pointer: give --pointer (or --channels) or set ${POINTER_ENV}")
        fetch = default_fetch(args.endpoint_url)
        if args.command == "predict":
            model = load_model(fetch, read_record(fetch, args.pointer), args.cache, args.format_name, args.threads)
            _print_predictions(model, args.images)
        else:
            _follow(args, fetch)
    except EdgeClientError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


def _print_predictions(model: LoadedModel, images: Sequence[Path]) -> None:
    for image in images:
        line = {**model.predict(image).as_dict(), "format": model.format,
                "training_job_name": model.training_job_name}
        print(json.dumps(line), flush=True)


def _follow(args: argparse.Namespace, fetch) -> None:
    if args.channels and args.pointer:
        raise EdgeClientError("give --pointer or --channels, not both")
    if args.channels and not (args.device_id and is_valid_device_id(args.device_id)):
        raise EdgeClientError(f"--channels needs --device-id matching {DEVICE_ID_PATTERN}")
    report = args.report
    if args.channels and report is None:
        report = f"{published_prefix_of(args.channels).rstrip('/').rsplit('/', 1)[0]}/devices/{args.device_id}/status.json"
    follower = Follower(fetch, args.pointer, args.cache, args.format_name, args.threads,
                        channels_prefix=args.channels, device_id=args.device_id)
    reporter = Reporter(report, args.endpoint_url, log=_log) if report else None

    def on_event(event: FollowEvent) -> None:
        print(json.dumps({"event": event.kind, "training_job_name": event.training_job_name,
                          "channel": follower.channel, "detail": event.detail}), flush=True)
        if event.kind in ("loaded", "switched") or (args.infer_every_poll and follower.model is not None):
            _print_classified(follower, args.images)
        if reporter:
            reporter.put(status_record(
                device_id=args.device_id or "", channel=follower.channel, pointer=follower.pointer_read,
                running=follower.running(), last_event=event.kind,
                last_error=event.detail if event.kind in ("kept", "waiting") else None, counter=follower.counter,
                runtime=_runtime(follower)))

    follow(follower, args.interval, on_event, args.max_polls)


def _print_classified(follower: Follower, images: Sequence[Path]) -> None:
    for image in images:
        prediction = follower.classify(image)
        if prediction is not None and follower.model is not None:
            print(json.dumps({**prediction.as_dict(), "format": follower.model.format,
                              "training_job_name": follower.model.training_job_name}), flush=True)


def _runtime(follower: Follower) -> str | None:
    if follower.model is None:
        return None
    runtime = str(follower.model.metadata.get("runtime"))
    try:
        from importlib.metadata import version

        return f"{runtime} {version(RUNTIMES.get(runtime, (runtime, runtime))[1])}"
    except Exception:  # not installed as a distribution: the name alone
        return runtime


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
