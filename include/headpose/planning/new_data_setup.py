"""airflow-init's new-data step: the queue, its policy and the bucket's notification.

Converges: a queue that exists gets the policy again, and the bucket's notification
configuration keeps every entry but this deployment's own (``NOTIFICATION_ID``), which it
replaces. The clients are the Airflow connection's (airflow-init makes them), so a wrong
endpoint, account or permission stops the stack at start, not at the first upload.

AWS sends the queue an ``s3:TestEvent`` when the notification is set; the watcher
records it as a message that names no upload, and no run trains on it.
Standard library only: the clients are passed in.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from headpose.planning.iam import Deployment, new_data_queue_policy
from headpose.planning.layout import split_s3_uri
from headpose.planning.profile import DeploymentSettings

NOTIFICATION_ID = "headpose-new-data"


def queue_parts(queue_url: str) -> tuple[str, str, str]:
    """``(region, account, name)`` of ``https://sqs.<region>.amazonaws.com/<account>/<name>``."""
    host, account, name = queue_url.split("://", 1)[1].split("/")
    return host.split(".")[1], account, name


def set_up_new_data(s3: Any, sqs: Any, settings: DeploymentSettings, log: Callable[[str], None] = print) -> None:
    """The queue of ``new_data_queue``, its policy and ``new_data_prefix``'s notification to it."""
    region, account, name = queue_parts(settings.new_data_queue)
    bucket, prefix = split_s3_uri(settings.new_data_prefix)
    deployment = Deployment(bucket=bucket, region=region, account=account, new_data_queue=name)
    policy = json.dumps(new_data_queue_policy(deployment))
    url = sqs.create_queue(QueueName=name)["QueueUrl"]  # returns the existing queue's URL
    if url.rstrip("/").split("/")[-2:] != [account, name]:
        raise RuntimeError(f"new_data_queue {settings.new_data_queue} names account {account}, but the connection "
                           f"made {url}: set the URL of the connection's own account")
    sqs.set_queue_attributes(QueueUrl=settings.new_data_queue, Attributes={"Policy": policy})
    current = s3.get_bucket_notification_configuration(Bucket=bucket)
    current.pop("ResponseMetadata", None)
    queues = [entry for entry in current.get("QueueConfigurations", []) if entry.get("Id") != NOTIFICATION_ID]
    queues.append({"Id": NOTIFICATION_ID, "QueueArn": deployment.queue_arn, "Events": ["s3:ObjectCreated:*"],
                   "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": prefix}]}}})
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={**current, "QueueConfigurations": queues})
    log(f"airflow-init: uploads under {settings.new_data_prefix} notify {settings.new_data_queue}")
