"""Fetch the published model by its pointer, verify every file, run it; follow pointer changes.

The pointer (``published/latest.json``, a version 3 record) names each edge format's
files by URI and sha256, and carries the format's metadata. The client reads it through
a function it is given (``Fetch``: URI -> bytes), so the same code reads S3 or a local
file. Files are kept in a cache folder per model version (named by the sha256 of the
file the runtime loads); a cached file is used only while its sha256 still matches the
pointer's, and a download whose sha256 differs is refused and not kept. A cached file is
only ever replaced by a rename, never rewritten in place: OpenVINO and LiteRT map model
files into memory, and a mapped file changed under a running model crashes the process
(SIGBUS), where a rename leaves the running model its old file.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

from headpose.edge.channels import CANARY, STABLE, channel_uri, is_canary
from headpose.edge.errors import EdgeClientError
from headpose.edge.labels import class_labels
from headpose.edge.preprocess import Preprocessing, load_image, preprocessing_of
from headpose.edge.reporting import HealthCounter, utc_now
from headpose.edge.runtimes import RUNTIMES, Runner, open_runner, runtime_available
from headpose.registry.record import RecordError, record_channel_order, record_formats

Fetch = Callable[[str], bytes]
# Which format to run when none is asked for: float32 first (exact), then reduced precision.
PREFERRED_FORMATS = ("openvino_fp32", "onnx", "litert_float32", "openvino_fp16", "openvino_int8", "onnx_int8",
                     "litert_int8", "openvino_bf16")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def default_fetch(endpoint_url: str | None = None) -> Fetch:
    """A ``Fetch`` for ``s3://`` URIs (boto3, imported on first use) and local paths."""
    clients: list = []

    def fetch(uri: str) -> bytes:
        parsed = urlparse(uri)
        if parsed.scheme != "s3":
            return read_local(uri)
        if not clients:
            import boto3

            clients.append(boto3.client("s3", endpoint_url=endpoint_url))
        try:
            return clients[0].get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"].read()
        except Exception as error:  # botocore's ClientError, connection errors
            raise EdgeClientError(f"cannot read {uri}: {error}") from None

    return fetch


def read_local(uri: str) -> bytes:
    """A local path or ``file://`` URI's bytes."""
    path = Path(urlparse(uri).path if uri.startswith("file://") else uri)
    try:
        return path.read_bytes()
    except OSError as error:
        raise EdgeClientError(f"cannot read {uri}: {error.strerror or error}") from None


def read_record(fetch: Fetch, pointer: str) -> dict[str, Any]:
    """The record the pointer holds, refused unless it is a readable version."""
    try:
        record = json.loads(fetch(pointer))
    except ValueError as error:
        raise EdgeClientError(f"{pointer} is not JSON: {error}") from None
    if not isinstance(record, dict):
        raise EdgeClientError(f"{pointer} holds no record")
    try:
        record_formats(record)
    except RecordError as error:
        raise EdgeClientError(f"{pointer}: {error}") from None
    return record


def choose_format(record: Mapping[str, Any], name: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(name, entry)`` of the format to run: ``name``, or the first preferred one that runs here."""
    formats = record_formats(record)
    job = record.get("training_job_name")
    if not formats:
        raise EdgeClientError(f"the published model {job} has no edge formats")
    if name is not None:
        if name not in formats:
            raise EdgeClientError(f"format {name!r} is not published for {job}; published: {', '.join(sorted(formats))}")
        return name, formats[name]
    ordered = [n for n in PREFERRED_FORMATS if n in formats] + sorted(n for n in formats if n not in PREFERRED_FORMATS)
    for candidate in ordered:
        if runtime_available(formats[candidate].get("runtime", "")):
            return candidate, formats[candidate]
    runtimes = sorted({formats[n].get("runtime", "?") for n in formats})
    raise EdgeClientError(f"no published format of {job} runs here: install one of "
                          f"{[RUNTIMES.get(r, (r, r))[1] for r in runtimes]}")


def format_files(name: str, entry: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{file name: {"uri", "sha256"}}`` of a format entry, every name and checksum checked."""
    files = entry.get("files") or {Path(urlparse(str(entry.get("uri", ""))).path).name: entry}
    checked = {}
    for file, ref in files.items():
        if not file or file in (".", "..") or Path(file).name != file:
            raise EdgeClientError(f"format {name} names a file {file!r} that is not a plain file name")
        if not isinstance(ref, Mapping) or not ref.get("uri") or not _SHA256.match(str(ref.get("sha256", ""))):
            raise EdgeClientError(f"format {name} gives file {file} no URI and sha256")
        checked[file] = {"uri": str(ref["uri"]), "sha256": str(ref["sha256"])}
    return checked


def cached_files(fetch: Fetch, cache_dir: str | Path, name: str, entry: Mapping[str, Any]) -> Path:
    """The folder holding the format's files, each verified; downloads only what is missing or changed."""
    files = format_files(name, entry)
    sha256 = str(entry.get("sha256", ""))
    if not _SHA256.match(sha256):
        raise EdgeClientError(f"format {name} has no sha256")
    folder = Path(cache_dir) / sha256
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for file, ref in files.items():
            _cache_file(fetch, folder / file, name, ref)
    except EdgeClientError:
        if not any(folder.iterdir()):
            folder.rmdir()  # a version that never verified leaves no trace
        raise
    return folder


def _cache_file(fetch: Fetch, path: Path, name: str, ref: Mapping[str, str]) -> None:
    if path.is_file() and _file_sha256(path) == ref["sha256"]:
        return
    data = fetch(ref["uri"])
    actual = hashlib.sha256(data).hexdigest()
    if actual != ref["sha256"]:
        raise EdgeClientError(f"{path.name} of format {name} ({ref['uri']}) has sha256 {actual}, "
                              f"the pointer says {ref['sha256']}: refused")
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


@dataclass(frozen=True)
class Prediction:
    image: str
    class_index: int
    label: str
    probabilities: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image, "class": self.class_index, "label": self.label,
                "probability": self.probabilities[self.label], "probabilities": self.probabilities}


@dataclass(frozen=True)
class LoadedModel:
    """One model version, verified and open in its runtime."""

    training_job_name: str
    format: str
    sha256: str
    metadata: dict
    preprocessing: Preprocessing
    labels: tuple[str, ...]
    runner: Runner

    def predict(self, image_path: str | Path) -> Prediction:
        probabilities = self.runner(load_image(image_path, self.preprocessing))[0]
        index = int(probabilities.argmax())
        values = {label: round(float(p), 6) for label, p in zip(self.labels, probabilities)}
        return Prediction(str(image_path), index, self.labels[index], values)


def load_model(fetch: Fetch, record: Mapping[str, Any], cache_dir: str | Path,
               format_name: str | None = None, threads: int | None = None) -> LoadedModel:
    """The record's model in the chosen format: files verified into the cache, runtime opened."""
    name, entry = choose_format(record, format_name)
    metadata = entry.get("metadata")
    if not isinstance(metadata, Mapping) or metadata.get("format") != name:
        raise EdgeClientError(f"format {name} carries no metadata of its own in the pointer")
    preprocessing = preprocessing_of(metadata)
    try:
        published_order = record_channel_order(record)
    except RecordError as error:
        raise EdgeClientError(str(error)) from None
    if published_order != preprocessing.channel_order:
        raise EdgeClientError(f"format {name} expects {preprocessing.channel_order.upper()} images, "
                              f"the pointer says the model was trained on {published_order.upper()}")
    if metadata.get("model_file") not in format_files(name, entry):
        raise EdgeClientError(f"format {name} runs {metadata.get('model_file')!r}, which it does not list")
    folder = cached_files(fetch, cache_dir, name, entry)
    return LoadedModel(str(record.get("training_job_name")), name, str(entry["sha256"]), dict(metadata),
                       preprocessing, tuple(class_labels(metadata.get("classes") or [])),
                       open_runner(metadata, folder, threads))


@dataclass(frozen=True)
class FollowEvent:
    kind: str  # "loaded", "switched", "unchanged", "kept" or (on a channel, nothing to run yet) "waiting"
    training_job_name: str
    detail: str = ""


class Follower:
    """Polls the pointer; swaps to a new version only once it is verified and open.

    Any failure with a new version (unreadable pointer, missing format, bad checksum, a
    runtime refusing the file) keeps the model that runs; it is tried again next poll.
    With ``channels_prefix`` (``.../published/channels/``) and ``device_id`` the pointer
    is chosen each poll: ``canary.json`` when its ``rollout`` makes this device a canary,
    else ``stable.json`` (also when the canary cannot be read). Every inference and every
    version that fails to load is counted in ``counter`` for the device's report.
    """

    def __init__(self, fetch: Fetch, pointer: str | None, cache_dir: str | Path,
                 format_name: str | None = None, threads: int | None = None, *,
                 channels_prefix: str | None = None, device_id: str | None = None):
        if not pointer and not channels_prefix:
            raise EdgeClientError("no pointer: give a pointer or a channels prefix")
        self.fetch, self.pointer, self.cache_dir = fetch, pointer, cache_dir
        self.format_name, self.threads = format_name, threads
        self.channels_prefix, self.device_id = channels_prefix, device_id
        self.model: LoadedModel | None = None
        self.since: str | None = None
        self.channel, self.pointer_read = "latest", str(pointer or "")
        self.counter = HealthCounter()

    def current_pointer(self) -> tuple[str, str]:
        """``(channel, pointer URI)`` this device follows now."""
        if not self.channels_prefix:
            return "latest", str(self.pointer)
        canary_uri = channel_uri(self.channels_prefix, CANARY)
        try:
            canary = json.loads(self.fetch(canary_uri))
        except (EdgeClientError, ValueError):
            canary = None
        if isinstance(canary, dict) and is_canary(str(self.device_id), canary.get("rollout")):
            return CANARY, canary_uri
        return STABLE, channel_uri(self.channels_prefix, STABLE)

    def poll(self) -> FollowEvent:
        """Read the pointer once; raises only while no model has been loaded yet (without channels)."""
        self.channel, pointer = self.current_pointer()
        self.pointer_read = pointer
        job = ""
        try:
            record = read_record(self.fetch, pointer)
            job = str(record.get("training_job_name"))
            name, entry = choose_format(record, self.format_name)
            if self.model and (job, name, entry.get("sha256")) == (
                    self.model.training_job_name, self.model.format, self.model.sha256):
                return FollowEvent("unchanged", self.model.training_job_name)
            model = load_model(self.fetch, record, self.cache_dir, self.format_name, self.threads)
        except EdgeClientError as error:
            if job:
                self.counter.load_failed(job)
            if self.model is None and not self.channels_prefix:
                raise
            if self.model is None:  # a stable device before anything is stable: it waits
                return FollowEvent("waiting", "", str(error))
            return FollowEvent("kept", self.model.training_job_name, str(error))
        kind = "switched" if self.model else "loaded"
        previous = self.model.training_job_name if self.model else ""
        self.model, self.since = model, utc_now()
        self.counter.switched()
        return FollowEvent(kind, model.training_job_name, f"from {previous}" if previous else "")

    def classify(self, image_path: str | Path) -> Prediction | None:
        """The running model's prediction, counted (None, and an error counted, when it fails)."""
        if self.model is None:
            return None
        started = time.perf_counter()
        try:
            prediction = self.model.predict(image_path)
        except Exception:  # each runtime raises its own errors; the report counts them
            self.counter.failed()
            return None
        self.counter.inferred((time.perf_counter() - started) * 1000.0, prediction.class_index)
        return prediction

    def running(self) -> dict[str, Any] | None:
        """What the report says this device runs."""
        if self.model is None:
            return None
        return {"training_job_name": self.model.training_job_name, "format": self.model.format,
                "sha256": self.model.sha256, "since": self.since}


def follow(follower: Follower, interval_s: float, on_event: Callable[[FollowEvent], None],
           max_polls: int | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll every ``interval_s`` seconds (``max_polls`` times, or for ever), reporting each event."""
    polls = 0
    while max_polls is None or polls < max_polls:
        if polls:
            sleep(interval_s)
        on_event(follower.poll())
        polls += 1


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
