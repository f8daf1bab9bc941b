"""Command line of the fleet: ``python -m headpose.fleet greengrass-deployment ...``.

``greengrass-deployment`` prints the ``CreateDeployment`` request of a published version's
component (``aws greengrassv2 create-deployment --cli-input-json "$(...)"`` sends it): an
exponential rollout that is cancelled, and rolled back on each failed device, when too many fail.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from headpose.fleet.greengrass import GreengrassError, component_version, deployment_request, greengrass_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m headpose.fleet", description="The device fleet's tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    deployment = commands.add_parser("greengrass-deployment",
                                     help="print the CreateDeployment request of a version's Greengrass component")
    deployment.add_argument("--job", required=True, help="the published version's training job name")
    deployment.add_argument("--target-arn", required=True,
                            help="the AWS IoT thing group (or thing): arn:aws:iot:REGION:ACCOUNT:thinggroup/NAME")
    deployment.add_argument("--interval-seconds", type=float, default=None,
                            help="poll interval on the devices (default: the recipe's, from the profile)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from headpose.planning.profile import load_profile

    settings = greengrass_settings({"greengrass": load_profile().settings.greengrass})
    try:
        request = deployment_request(
            target_arn=args.target_arn, component_name=settings["component_name"], version=component_version(args.job),
            configuration={"IntervalSeconds": args.interval_seconds} if args.interval_seconds else None)
    except GreengrassError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(request, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
