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

from headpose.edge.client import Follower, FollowEvent, LoadedModel, default_fetch, follow, load_model, read_record
from headpose.edge.errors import EdgeClientError

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
    for command in (predict, watch):
        command.add_argument("--pointer", default=os.environ.get(POINTER_ENV),
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
        if not args.pointer:
            raise EdgeClientError(f"no pointer: give --pointer or set ${POINTER_ENV}")
        fetch = default_fetch(args.endpoint_url)
        if args.command == "predict":
            model = load_model(fetch, read_record(fetch, args.pointer), args.cache, args.format_name, args.threads)
            _print_predictions(model, args.images)
        else:
            follower = Follower(fetch, args.pointer, args.cache, args.format_name, args.threads)
            follow(follower, args.interval, lambda event: _on_event(follower, event, args.images), args.max_polls)
    except EdgeClientError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


def _print_predictions(model: LoadedModel, images: Sequence[Path]) -> None:
    for image in images:
        line = {**model.predict(image).as_dict(), "format": model.format,
                "training_job_name": model.training_job_name}
        print(json.dumps(line), flush=True)


def _on_event(follower: Follower, event: FollowEvent, images: Sequence[Path]) -> None:
    print(json.dumps({"event": event.kind, "training_job_name": event.training_job_name,
                      "detail": event.detail}), flush=True)
    if event.kind in ("loaded", "switched") and follower.model is not None:
        _print_predictions(follower.model, images)


if __name__ == "__main__":
    sys.exit(main())
