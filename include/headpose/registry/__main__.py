"""Command line of the registry: ``python -m headpose.registry show|history|rollback|channels|promote``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from headpose.planning.s3_calls import pin_bucket_owner
from headpose.planning.layout import DEFAULT_FOLDER, join_uri
from headpose.planning.request import inference_image_uri
from headpose.registry.model_packages import ModelRegistry
from headpose.registry.pointer import POINTER_NAME, PublishError, history, published_prefix, read_pointer
from headpose.registry.rollback import rollback, rollback_channel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m headpose.registry",
        description="Inspect the published head-pose model and roll it back. AWS credentials "
        "and region come from the usual boto3 sources (environment, profile, instance role).",
    )
    parser.add_argument("--bucket", required=True, help="the s3_bucket of the runs")
    parser.add_argument("--folder", default=DEFAULT_FOLDER, help="the headpose_folder (default: headpose)")
    parser.add_argument("--endpoint-url", default=None, help="an S3-compatible endpoint (e.g. moto, MinIO)")
    parser.add_argument("--expected-bucket-owner", default=None, metavar="ACCOUNT",
                        help="refuse a bucket that another AWS account owns (sent with every S3 call)")
    parser.add_argument("--model-package-group", default="headpose", metavar="GROUP",
                        help="SageMaker Model Registry group a rollback updates (the profile's "
                        "model_package_group; default headpose; '' leaves the Model Registry alone)")
    parser.add_argument("--sagemaker-endpoint-url", default=None,
                        help="SageMaker's endpoint (default: --endpoint-url, which moto serves too)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="print latest.json")
    commands.add_parser("history", help="list every published model, oldest first")
    back = commands.add_parser("rollback", help="point latest.json at an earlier published model")
    back.add_argument("--to", dest="to_job", default=None,
                      help="training_job_name to restore (default: the pointer's previous)")
    back.add_argument("--no-mirror", dest="mirror", action="store_false",
                      help="leave published/latest/ alone (for deployments without the mirror)")
    back.add_argument("--channel", choices=("stable", "canary"), default=None,
                      help="with a rollout: the channel to move (default stable where the channels exist; "
                           "canary: back to the stable version unless --to says otherwise)")
    back.add_argument("--by", default=_user(), help="who rolls back, for the decision record (default: $USER)")
    commands.add_parser("channels", help="print the canary and stable channels and the last rollout decision")
    promote = commands.add_parser("promote", help="promote the canary to stable by hand (as headpose_rollout would)")
    promote.add_argument("--expected-canary", default=None, metavar="JOB",
                         help="refuse unless the canary still names this training job")
    promote.add_argument("--comment", default="", help="why, for the decision record")
    promote.add_argument("--by", default=_user(), help="who promotes (default: $USER)")
    promote.add_argument("--no-mirror", dest="mirror", action="store_false", help="leave published/latest/ alone")
    return parser


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user name in a container: the decision says so
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    import boto3

    args = build_parser().parse_args(argv)
    s3_client = pin_bucket_owner(boto3.client("s3", endpoint_url=args.endpoint_url), args.expected_bucket_owner)
    try:
        if args.command == "show":
            record, _ = read_pointer(s3_client, join_uri(published_prefix(args.bucket, args.folder), POINTER_NAME))
            print(json.dumps(record, indent=2, sort_keys=True))
        elif args.command == "history":
            for record in history(s3_client, args.bucket, args.folder):
                accuracy = (record.get("metrics") or {}).get("accuracy")
                print(f"{record.get('published_at')}  {record['training_job_name']}  accuracy={accuracy}")
        elif args.command == "channels":
            from headpose.fleet.rollout import last_decision
            from headpose.registry.channels import read_channels

            state = read_channels(s3_client, args.bucket, args.folder)
            print(json.dumps({"channels": {name: _brief(record) for name, record in state.items()},
                              "last_decision": last_decision(s3_client, args.bucket, args.folder)},
                             indent=2, sort_keys=True))
        elif args.command == "promote":
            from headpose.fleet.rollout import act_by_hand

            decision = act_by_hand(s3_client, bucket=args.bucket, folder=args.folder, action="promote", by=args.by,
                                   comment=args.comment, expected_canary=args.expected_canary, mirror=args.mirror)
            print(f"promoted {decision['canary']['training_job_name']} (decision {decision['id']})")
        elif args.channel or _has_channels(s3_client, args):
            rollback_channel(s3_client, args.bucket, args.folder, args.channel or "stable", args.to_job, by=args.by,
                             mirror=args.mirror, model_registry=_model_registry(args))
        else:
            rollback(s3_client, args.bucket, args.folder, args.to_job, mirror=args.mirror,
                     model_registry=_model_registry(args))
    except (PublishError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _has_channels(s3_client, args: argparse.Namespace) -> bool:
    from headpose.registry.channels import read_channels

    return read_channels(s3_client, args.bucket, args.folder)["stable"] is not None


def _brief(record: dict | None) -> dict | None:
    if record is None:
        return None
    return {key: record.get(key) for key in ("training_job_name", "published_at", "channel_moved", "rolled_back")}


def _model_registry(args: argparse.Namespace) -> ModelRegistry | None:
    import boto3

    if not args.model_package_group:
        return None
    client = boto3.client("sagemaker", endpoint_url=args.sagemaker_endpoint_url or args.endpoint_url)
    return ModelRegistry(client, args.model_package_group,
                         lambda: inference_image_uri(client.meta.region_name))


if __name__ == "__main__":
    sys.exit(main())
