"""The IAM documents of a deployment: the Airflow workers' policy and the SageMaker execution role's.

One definition, in code, so that the documents follow the S3 layout (``planning.layout``)
and the job names (``base_job_name``) the pipeline uses, and gain a KMS statement exactly
where the deployment names a key. ``deploy/iam/*.json`` are these documents with
placeholders (``tests/test_iam.py`` keeps them equal); a deployment prints its own::

    PYTHONPATH=include python -m headpose.planning.iam --bucket my-bucket --account 123456789012 \\
        --region eu-west-1 --execution-role HeadposeSageMakerExecution [--kms-key-id arn:aws:kms:...] \\
        [--object-lock] [--new-data-queue NAME] [--model-package-group headpose] \\
        worker|execution-role|new-data-queue|device|trust

Every S3 statement on objects or the bucket carries ``s3:ResourceAccount``: a bucket of
the expected name that another account owns is refused by IAM as well as by
``ExpectedBucketOwner``. Standard library only.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

VERSION = "2012-10-17"
SAGEMAKER = "sagemaker.amazonaws.com"


@dataclass(frozen=True)
class Deployment:
    """What the documents name; the defaults are the placeholders of ``deploy/iam``."""

    bucket: str = "BUCKET"
    folder: str = "FOLDER"
    region: str = "REGION"
    account: str = "ACCOUNT"
    base_job_name: str = "BASE-JOB-NAME"
    execution_role: str = "EXECUTION-ROLE"
    kms_key_id: str | None = None
    object_lock: bool = False
    # retrain_on data or either: the queue's name (the last part of new_data_queue); None: no queue.
    new_data_queue: str | None = "NEW-DATA-QUEUE"
    model_package_group: str = "MODEL-PACKAGE-GROUP"  # the profile's; empty: no Model Registry
    # greengrass.component_name where greengrass.create_component is set; None: publish creates none.
    greengrass_component: str | None = None

    @property
    def owned(self) -> dict[str, Any]:
        return {"StringEquals": {"s3:ResourceAccount": self.account}}

    @property
    def objects(self) -> str:
        return f"arn:aws:s3:::{self.bucket}/{self.folder}/*"

    @property
    def bucket_arn(self) -> str:
        return f"arn:aws:s3:::{self.bucket}"

    @property
    def model_packages(self) -> list[str]:
        """The deployment's model package group and its versions (SageMaker lower-cases names in ARNs)."""
        group = self.model_package_group.lower()
        prefix = f"arn:aws:sagemaker:{self.region}:{self.account}"
        return [f"{prefix}:model-package-group/{group}", f"{prefix}:model-package/{group}/*"]

    @property
    def component_versions(self) -> str:
        return f"arn:aws:greengrass:{self.region}:{self.account}:components:{self.greengrass_component}:versions:*"

    @property
    def queue_arn(self) -> str:
        return f"arn:aws:sqs:{self.region}:{self.account}:{self.new_data_queue}"

    @property
    def training_log(self) -> str:
        return f"arn:aws:logs:{self.region}:{self.account}:log-group:/aws/sagemaker/TrainingJobs:*"


def _statement(sid: str, actions: list[str], resource: str | list[str], condition: dict | None = None) -> dict:
    statement = {"Sid": sid, "Effect": "Allow", "Action": actions, "Resource": resource}
    if condition:
        statement["Condition"] = condition
    return statement


def worker_policy(d: Deployment) -> dict[str, Any]:
    """The Airflow workers' and triggerer's principal (connection ``aws_default``)."""
    statements = [
        _statement("StartWatchAndStopTheRunsTrainingJobs",
                   ["sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob",
                    "sagemaker:AddTags"],
                   f"arn:aws:sagemaker:{d.region}:{d.account}:training-job/{d.base_job_name.lower()}-*"),
        _statement("HandTheExecutionRoleToSageMaker", ["iam:PassRole"],
                   f"arn:aws:iam::{d.account}:role/{d.execution_role}",
                   {"StringEquals": {"iam:PassedToService": SAGEMAKER}}),
        _statement("CreateTheBucketAtStart", ["s3:CreateBucket"], d.bucket_arn),
        _statement("ListAndLocateTheBucket", ["s3:ListBucket", "s3:GetBucketLocation"], d.bucket_arn, d.owned),
        _statement("DatasetsCodeArtifactsAndThePublishedModel",
                   ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"], d.objects, d.owned),
        _statement("TheJobsLogInTheTaskLog", ["logs:DescribeLogStreams", "logs:GetLogEvents"], d.training_log),
    ]
    if d.new_data_queue:
        # The triggerer's watcher receives and deletes; airflow-init creates the queue, gives it
        # the queue policy and points the bucket's notification at it.
        statements.append(_statement("WatchTheNewDataQueue", ["sqs:ReceiveMessage", "sqs:DeleteMessage"], d.queue_arn))
        statements.append(_statement("SetUpTheNewDataQueue",
                                     ["sqs:CreateQueue", "sqs:SetQueueAttributes"], d.queue_arn))
        statements.append(_statement("NotifyTheQueueOfUploads", ["s3:GetBucketNotification", "s3:PutBucketNotification"],
                                     d.bucket_arn, d.owned))
    if d.model_package_group:
        # SageMaker's Model Registry: the group, and each version's package in it, created and
        # moved between PendingManualApproval, Approved and Rejected (registry.model_packages).
        statements.append(_statement("RegisterEveryVersionInTheModelRegistry", [
            "sagemaker:CreateModelPackageGroup", "sagemaker:DescribeModelPackageGroup",
            "sagemaker:CreateModelPackage", "sagemaker:UpdateModelPackage"], d.model_packages))
        # A version's package is found again by listing the group; list calls take no resource.
        statements.append(_statement("FindAVersionsPackage", ["sagemaker:ListModelPackages"], "*"))
    if d.greengrass_component:
        # publish creates the version's component; a retry reads it back to accept the same recipe.
        statements.append(_statement("CreateEachVersionsGreengrassComponent",
                                     ["greengrass:CreateComponentVersion", "greengrass:GetComponent"],
                                     d.component_versions))
    if d.object_lock:
        statements.append(_statement("LockThePublishedVersions", ["s3:GetBucketObjectLockConfiguration"],
                                     d.bucket_arn, d.owned))
        statements.append(_statement("LockThePublishedVersionFiles", ["s3:PutObjectRetention"], d.objects, d.owned))
    if d.kms_key_id:
        # SSE-KMS reads and writes of every object; the grant lets SageMaker use the key
        # for the job's volume and output on the caller's behalf.
        statements.append(_statement("TheDeploymentsKmsKey", ["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"],
                                     d.kms_key_id))
        statements.append(_statement("SageMakerUsesTheKeyForTheJob", ["kms:CreateGrant"], d.kms_key_id,
                                     {"Bool": {"kms:GrantIsForAWSResource": "true"}}))
    return {"Version": VERSION, "Statement": statements}


def execution_role_policy(d: Deployment) -> dict[str, Any]:
    """What SageMaker's training job does as the execution role (the run's ``role_arn``)."""
    statements = [
        _statement("ReadTheDatasetAndTheCode", ["s3:GetObject"],
                   [f"arn:aws:s3:::{d.bucket}/{d.folder}/datasets/*", f"arn:aws:s3:::{d.bucket}/{d.folder}/customTFcodes/*"],
                   d.owned),
        _statement("ListTheChannel", ["s3:ListBucket"], d.bucket_arn,
                   {**d.owned, "StringLikeIfExists": {"s3:prefix": [f"{d.folder}/*"]}}),
        # The TensorFlow image asks for it when a job is given an S3 model_dir; the pipeline
        # gives none, a hand-made request may.
        _statement("LocateTheBucket", ["s3:GetBucketLocation"], d.bucket_arn, d.owned),
        _statement("WriteTheModelOutputDataAndSpotCheckpoints", ["s3:PutObject", "s3:GetObject"],
                   f"arn:aws:s3:::{d.bucket}/{d.folder}/TFartifacts/*", d.owned),
        _statement("TheTrainingLog",
                   ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                   d.training_log),
        _statement("TheMetricDefinitions", ["cloudwatch:PutMetricData"], "*",
                   {"StringEquals": {"cloudwatch:namespace": "/aws/sagemaker/TrainingJobs"}}),
        _statement("PullTheTensorFlowImage", ["ecr:GetAuthorizationToken"], "*"),
        _statement("PullTheTensorFlowImageLayers",
                   ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"],
                   f"arn:aws:ecr:{d.region}:*:repository/tensorflow-training"),
    ]
    if d.kms_key_id:
        statements.append(_statement("TheDeploymentsKmsKey",
                                     ["kms:Decrypt", "kms:GenerateDataKey", "kms:Encrypt", "kms:DescribeKey"],
                                     d.kms_key_id))
        statements.append(_statement("TheTrainingVolumeKey", ["kms:CreateGrant"], d.kms_key_id,
                                     {"Bool": {"kms:GrantIsForAWSResource": "true"}}))
    return {"Version": VERSION, "Statement": statements}


def trust_policy() -> dict[str, Any]:
    return {"Version": VERSION, "Statement": [{
        "Sid": "SageMakerRunsTrainingJobsAsThisRole", "Effect": "Allow",
        "Principal": {"Service": SAGEMAKER}, "Action": "sts:AssumeRole",
    }]}


def new_data_queue_policy(d: Deployment) -> dict[str, Any]:
    """The queue's own policy: S3 may send it the bucket's notifications, no other bucket or account."""
    return {"Version": VERSION, "Statement": [{
        "Sid": "TheBucketNotifiesUploads", "Effect": "Allow", "Principal": {"Service": "s3.amazonaws.com"},
        "Action": "sqs:SendMessage", "Resource": d.queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": d.bucket_arn}, "StringEquals": {"aws:SourceAccount": d.account}},
    }]}


THING_NAME = "${credentials-iot:ThingName}"


def device_policy(d: Deployment) -> dict[str, Any]:
    """An edge device's role (AWS IoT credentials provider): read the channels and the edge files
    they name, write its own report only - ``${credentials-iot:ThingName}`` is the caller's thing
    name, so one device cannot write (or forge) another's report, nor move a pointer."""
    published = f"arn:aws:s3:::{d.bucket}/{d.folder}/published"
    statements = [
        _statement("ReadTheChannelsAndTheFilesTheyName", ["s3:GetObject"], [
            f"{published}/channels/*", f"{published}/latest.json", f"{published}/latest/*",
            f"arn:aws:s3:::{d.bucket}/{d.folder}/TFartifacts/*/output/edge/*",
        ], d.owned),
        _statement("WriteItsOwnReport", ["s3:PutObject"],
                   f"arn:aws:s3:::{d.bucket}/{d.folder}/devices/{THING_NAME}/status.json", d.owned),
    ]
    if d.kms_key_id:
        statements.append(_statement("UseTheBucketsKey", ["kms:Decrypt", "kms:GenerateDataKey"], d.kms_key_id))
    return {"Version": VERSION, "Statement": statements}


def s3_part(policy: dict[str, Any]) -> dict[str, Any]:
    """The policy's S3 statements only: what moto's enforcement evaluates with resources."""
    return {**policy, "Statement": [s for s in policy["Statement"] if all(a.startswith("s3:") for a in s["Action"])]}


def widened(policy: dict[str, Any]) -> dict[str, Any]:
    """Every non-S3 statement's resource widened to ``*``, for moto only.

    moto evaluates resources for S3, SQS, IAM and STS; any other service's request is
    checked against ``*``, which a statement scoped to ``training-job/<base>-*`` does not
    match. Never a document to deploy.
    """
    return {**policy, "Statement": [
        s if all(a.startswith("s3:") for a in s["Action"]) else {**s, "Resource": "*"} for s in policy["Statement"]
    ]}


DOCUMENTS = {"worker": worker_policy, "execution-role": execution_role_policy, "new-data-queue": new_data_queue_policy,
             "device": device_policy}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m headpose.planning.iam", description=__doc__.split("\n\n")[0])
    parser.add_argument("document", choices=[*DOCUMENTS, "trust"])
    for name in ("bucket", "region", "account", "execution-role"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--folder", default="headpose")
    parser.add_argument("--base-job-name", default="deeplens-TF-headpose")
    parser.add_argument("--kms-key-id", default=None, help="the profile's kms_key_id, if any")
    parser.add_argument("--object-lock", action="store_true", help="the profile sets object_lock_days")
    parser.add_argument("--model-package-group", default="headpose",
                        help="the profile's model_package_group ('' for none: no Model Registry statements)")
    parser.add_argument("--new-data-queue", default=None, help="the queue's name, where retrain_on is data or either")
    parser.add_argument("--greengrass-component", default=None,
                        help="the greengrass setting's component_name, where create_component is true")
    args = parser.parse_args(argv)
    if args.document == "trust":
        document = trust_policy()
    else:
        deployment = Deployment(args.bucket, args.folder, args.region, args.account, args.base_job_name,
                                args.execution_role, args.kms_key_id, args.object_lock, args.new_data_queue,
                                model_package_group=args.model_package_group,
                                greengrass_component=args.greengrass_component)
        document = DOCUMENTS[args.document](deployment)
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
