"""New data starts a run: the training data's asset, its watcher on the SQS queue, the DAG's schedule.

The bucket notifies the deployment's queue (``new_data_queue``) of every object created
under ``new_data_prefix``; ``NewDataTrigger`` - the Amazon provider's ``SqsSensorTrigger``,
run by the triggerer - receives and deletes those messages, and Airflow records each batch
as an event of the ``headpose_training_data`` asset. The event's extra names the uploads
(``headpose.planning.new_data.uploads_of_messages``), so the Assets view and the page of the
run it starts say which object arrived; ``plan_run`` picks the one the run trains on.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from airflow.providers.amazon.aws.triggers.sqs import SqsSensorTrigger
from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable
from airflow.triggers.base import TriggerEvent

TRAINING_DATA = "headpose_training_data"
WATCHER = "headpose_new_data_queue"
# SQS's longest poll: a message that arrives during it is returned at once, and an empty
# queue costs one request per 20 s instead of one per waiter_delay.
LONG_POLL_SECONDS = 20
MAX_MESSAGES = 10  # SQS's most per ReceiveMessage


class NewDataTrigger(SqsSensorTrigger):
    """``SqsSensorTrigger`` whose event names the uploads instead of carrying the raw messages.

    :param sqs_queue: the queue's URL (``new_data_queue``)
    :param waiter_delay: seconds between two polls that found nothing
    """

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from headpose.planning.new_data import uploads_of_messages

        while True:
            async for event in super().run():  # one batch of messages, received and deleted
                payload = uploads_of_messages(event.payload.get("message_batch", []))
                if payload["uploads"]:
                    yield TriggerEvent(payload)
                    return
                # No upload in it (S3's test event when the notification is set, a stray
                # message): logged here, and no run is started for nothing.
                for other in payload["other_messages"]:
                    self.log.warning("new data: ignored SQS message %s: %s", other["message_id"], other["reason"])


def training_data_asset(new_data_prefix: str, new_data_queue: str, aws_conn_id: str, poll_seconds: int) -> Asset:
    """The training data under ``new_data_prefix``, watched through ``new_data_queue``."""
    region = new_data_queue.split("://", 1)[1].split(".")[1]  # https://sqs.<region>.amazonaws.com/...
    trigger = NewDataTrigger(sqs_queue=new_data_queue, aws_conn_id=aws_conn_id, region_name=region,
                             max_messages=MAX_MESSAGES, wait_time_seconds=LONG_POLL_SECONDS, waiter_delay=poll_seconds)
    return Asset(name=TRAINING_DATA, uri=new_data_prefix, watchers=[AssetWatcher(name=WATCHER, trigger=trigger)])


def dag_schedule(cron: str | None, retrain_on: str, training_data: Asset | None) -> Any:
    """The DAG's ``schedule``: the cron, the training data's asset, or either (``retrain_on``)."""
    if retrain_on == "schedule" or training_data is None:
        return cron
    if retrain_on == "data" or cron is None:
        return training_data
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=training_data)
