"""New training data: what an upload under ``new_data_prefix`` asks a run to train on.

The bucket sends its ``ObjectCreated`` notifications for the prefix to the deployment's
SQS queue; the training data's asset watcher reads the queue in the triggerer and turns
each batch of messages into one asset event, whose extra holds ``uploads_of_messages``'
result. A run started by data gets the events it consumed (one run may consume several:
events that arrived while the previous run held the DAG); ``choose`` picks the upload it
trains on and says what became of every other one, so that none is lost unnoticed:

* ``refused``     outside the prefix, not an object creation, or of no kind it can train on;
* ``duplicate``   the same object (key and ETag) as the chosen one: a repeated notification;
* ``superseded``  an older upload than the chosen one: each upload is a whole dataset,
                  so the newest replaces what came before it.

Two kinds are trained on: a Prima-layout archive (``.tar.gz``/``.tgz``: converted as
``dataset_source=prima``) and a staged dataset's ``manifest.json`` (its folder is the
``dataset_source``). Standard library only: the triggerer and ``plan_run`` import it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import unquote_plus

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
MANIFEST_FILE = "manifest.json"
PRIMA_ARCHIVE, MANIFEST = "prima_archive", "manifest"


class NewDataError(ValueError):
    """No upload of the run's events can be trained on; the message lists each and why."""


@dataclass(frozen=True)
class Upload:
    """One object creation as S3's notification describes it."""

    uri: str
    etag: str
    size: int
    event_time: str
    event_name: str
    sequencer: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def uploads_of_messages(messages: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The asset event's extra for a batch of SQS messages: ``{"uploads": [...], "other_messages": [...]}``.

    A message that is not an S3 notification (S3's ``s3:TestEvent`` when the notification is
    set up, anything else sent to the queue) is kept as ``{"message_id", "reason"}``, never dropped.
    """
    uploads, others = [], []
    for message in messages:
        try:
            body = json.loads(message.get("Body") or "")
        except ValueError:
            others.append({"message_id": message.get("MessageId"), "reason": "the body is not JSON"})
            continue
        records = body.get("Records") if isinstance(body, dict) else None
        if not isinstance(records, list):
            reason = "S3's test event" if isinstance(body, dict) and body.get("Event") == "s3:TestEvent" \
                else "not an S3 event notification"
            others.append({"message_id": message.get("MessageId"), "reason": reason})
            continue
        for record in records:
            upload = _upload_of_record(record)
            if upload is None:
                others.append({"message_id": message.get("MessageId"), "reason": "a record without bucket and key"})
            else:
                uploads.append(upload.to_dict())
    return {"uploads": uploads, "other_messages": others}


def _upload_of_record(record: Any) -> Upload | None:
    try:
        s3 = record["s3"]
        bucket, obj = s3["bucket"]["name"], s3["object"]
        key = unquote_plus(obj["key"])  # S3 sends keys URL-encoded, spaces as '+'
    except (KeyError, TypeError):
        return None
    return Upload(uri=f"s3://{bucket}/{key}", etag=str(obj.get("eTag", "")).strip('"'), size=int(obj.get("size", 0)),
                  event_time=str(record.get("eventTime", "")), event_name=str(record.get("eventName", "")),
                  sequencer=str(obj.get("sequencer", "")))


def uploads_of_events(extras: Iterable[Mapping[str, Any]]) -> tuple[list[Upload], list[dict[str, Any]]]:
    """The uploads and the other messages of the asset events a run consumed (their ``extra``)."""
    uploads, others = [], []
    for extra in extras:
        payload = extra.get("payload", extra) if isinstance(extra, Mapping) else {}
        for item in payload.get("uploads", []) if isinstance(payload, Mapping) else []:
            uploads.append(Upload(**{k: item[k] for k in Upload.__dataclass_fields__ if k in item}))
        others.extend(payload.get("other_messages", []) if isinstance(payload, Mapping) else [])
    return uploads, others


def kind_of(upload: Upload, prefix: str) -> tuple[str | None, str]:
    """``(kind, "")`` of an upload a run can train on, else ``(None, why not)``."""
    if not upload.uri.startswith(prefix):
        return None, f"outside new_data_prefix {prefix}"
    if not upload.event_name.startswith("ObjectCreated:"):
        return None, f"{upload.event_name or 'an event'} is not an object creation"
    name = upload.uri[len(prefix):]
    if name.endswith(ARCHIVE_SUFFIXES):
        return PRIMA_ARCHIVE, ""
    if name == MANIFEST_FILE or name.endswith("/" + MANIFEST_FILE):
        return MANIFEST, ""
    return None, (f"of unknown kind: neither a Prima-layout archive ({', '.join(ARCHIVE_SUFFIXES)}) "
                  f"nor a staged dataset's {MANIFEST_FILE}")


@dataclass(frozen=True)
class NewData:
    """What a run started by data trains on, and what became of the other uploads it consumed."""

    chosen: Upload
    kind: str
    duplicates: list[dict[str, Any]]
    superseded: list[dict[str, Any]]
    refused: list[dict[str, Any]]
    other_messages: list[dict[str, Any]]

    def params(self) -> dict[str, Any]:
        """The run parameters that train on the chosen upload; everything else is the profile's."""
        if self.kind == PRIMA_ARCHIVE:
            return {"dataset_source": "prima", "prima_archive_uri": self.chosen.uri}
        return {"dataset_source": self.chosen.uri[: -len(MANIFEST_FILE)]}

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen.to_dict(), "kind": self.kind, "duplicates": self.duplicates,
                "superseded": self.superseded, "refused": self.refused, "other_messages": self.other_messages}

    def describe(self) -> list[str]:
        """The log's lines: the upload trained on, then every other one with what became of it."""
        lines = [f"trains on {self.chosen.uri} ({self.kind}, ETag {self.chosen.etag}, uploaded {self.chosen.event_time})"]
        lines += [f"duplicate notification of {d['uri']}" for d in self.duplicates]
        lines += [f"superseded by the newer upload: {s['uri']} (uploaded {s['event_time']})" for s in self.superseded]
        lines += [f"refused: {r['uri']}: {r['reason']}" for r in self.refused]
        lines += [f"ignored message {m.get('message_id')}: {m.get('reason')}" for m in self.other_messages]
        return lines


def choose(uploads: list[Upload], other_messages: list[dict[str, Any]], prefix: str) -> NewData:
    """The newest upload a run can train on, and the others accounted for; ``NewDataError`` if none."""
    usable, refused = [], []
    for upload in uploads:
        kind, reason = kind_of(upload, prefix)
        if kind is None:
            refused.append({**upload.to_dict(), "reason": reason})
        else:
            usable.append((upload, kind))
    if not usable:
        listed = [f"{r['uri']}: {r['reason']}" for r in refused] or ["the events named no upload"]
        listed += [f"message {m.get('message_id')}: {m.get('reason')}" for m in other_messages]
        raise NewDataError("no upload of this run's new-data events can be trained on:\n  - " + "\n  - ".join(listed))
    # Newest last; S3's sequencer orders events on one key within the same millisecond.
    usable.sort(key=lambda pair: (pair[0].event_time, pair[0].sequencer.rjust(32, "0")))
    chosen, kind = usable[-1]
    same = [u.to_dict() for u, _ in usable[:-1] if (u.uri, u.etag) == (chosen.uri, chosen.etag)]
    older = [u.to_dict() for u, _ in usable[:-1] if (u.uri, u.etag) != (chosen.uri, chosen.etag)]
    return NewData(chosen, kind, same, older, refused, list(other_messages))


def started_by(run_type: str, user: str | None, new_data: NewData | None) -> str:
    """What started the run, in words: the log's first line, the claim record, the summary."""
    if new_data is not None:
        return f"new data: {new_data.chosen.uri}"
    if run_type == "scheduled":
        return "the schedule"
    if run_type == "asset_triggered":
        return "an asset event"
    return f"{user or 'a person'} ({run_type.replace('_', ' ')})"


def start_lines(plan: Mapping[str, Any]) -> list[str]:
    """``plan_run``'s log: what started the run and, for new data, what became of every upload."""
    lines = [f"started by: {plan['started_by']}"]
    new_data = plan.get("new_data")
    if new_data:
        data = NewData(Upload(**new_data["chosen"]), new_data["kind"], new_data["duplicates"],
                       new_data["superseded"], new_data["refused"], new_data["other_messages"])
        lines += ["new data: " + line for line in data.describe()]
    return lines
