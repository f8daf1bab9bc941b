"""Command line of the registry: ``python -m headpose.registry show|history|rollback``."""
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
from headpose.registry.rollback import rollback


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
    return parser


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
        else:
            rollback(s3_client, args.bucket, args.folder, args.to_job, mirror=args.mirror,
                     model_registry=_model_registry(args))
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _model_registry(args: argparse.Namespace) -> ModelRegistry | None:
    import boto3

    if not args.model_package_group:
        return None
    client = boto3.client("sagemaker", endpoint_url=args.sagemaker_endpoint_url or args.endpoint_url)
    return ModelRegistry(client, args.model_package_group,
                         lambda: inference_image_uri(client.meta.region_name))


if __name__ == "__main__":
    sys.exit(main())
