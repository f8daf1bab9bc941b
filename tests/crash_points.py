"""Crash-point enumeration: every AWS call of an operation fails in turn, and state stays consistent.

An operation that writes what devices or people rely on (a model version, the pointer, the
mirror, a rollback; the approval record, the Model Registry and the channels as they come)
runs against moto's server with real boto3 clients. ``FaultInjector`` is a botocore event
hook on those clients: it counts every API call - reads and writes, S3 and SageMaker - and
makes the k-th one fail in one of four ways:

* ``error-before``: the request never reaches the store (the endpoint is unreachable);
* ``error-after``: the store did the work, but the answer is lost (a connection reset);
* ``died-before`` / ``died-after``: the worker process dies right before / right after that
  call: nothing the operation would have done afterwards happens.

For each k from 1 to the number of calls a clean run makes, and each way, ``enumerate_crash
_points`` puts the store back into the operation's starting state, runs the operation with
that fault, checks the invariants, then runs it again without faults on fresh clients (a
new process, as when a person clears the task or Airflow retries it) and checks them again.

The starting state is built once per operation and restored between scenarios from a
snapshot of its bucket (only the objects that changed are written back), so a scenario
costs the operation's own calls and a few more, not a rebuilt bucket. Where an error at
call k ended the operation at once (no call after it), a death at call k would leave the
very same store - the same calls made, no other - and is counted as covered by it
rather than run again; where the code went on after the error, the death is run too.
State the snapshot cannot hold - SageMaker's Model Registry in moto, which has no export -
is rebuilt by the operation's ``reset`` before each scenario: a fresh model package group
with the packages the starting state has (a few calls), so no scenario sees another's packages.
"""
from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

MODES = ("error-before", "died-before", "error-after", "died-after")
# A death right where an error ended the operation at once (it made no call after it)
# leaves the store exactly as that error did: the same calls were made, no other.
SAME_AS = {"died-before": "error-before", "died-after": "error-after"}


class ProcessDied(BaseException):
    """The worker is gone: a BaseException, so no ``except Exception`` in the code under test catches it."""


class ProcessDiedInThread(Exception):
    """A call after the worker died, from a transfer thread: an Exception there, because
    s3transfer's threads hand Exceptions to the caller (a BaseException would leave the
    caller waiting on a future forever, which a dead process does not do either)."""


class FaultInjector:
    """Counts every API call of ``clients``; with ``at``, makes call ``at`` fail as ``mode`` says.

    Once the process has "died", every later call fails before it is sent, so nothing the
    operation does after its death point reaches the store.
    """

    def __init__(self, clients: Iterable[Any], at: int | None = None, mode: str | None = None):
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.at, self.mode = at, mode
        self.calls: list[str] = []
        self.calls_after_fault = 0
        self.dead = False
        self._lock = threading.Lock()
        self._clients = list(clients)
        for client in self._clients:
            client.meta.events.register("before-call", self._before)
            client.meta.events.register("after-call", self._after)

    def remove(self) -> None:
        for client in self._clients:
            client.meta.events.unregister("before-call", self._before)
            client.meta.events.unregister("after-call", self._after)

    def _die(self) -> BaseException:
        self.dead = True
        if threading.current_thread() is threading.main_thread():
            return ProcessDied(f"the worker died at call {self.at} ({self.calls[self.at - 1]})")
        return ProcessDiedInThread(f"the worker died at call {self.at}")

    def _before(self, model, **_: Any) -> None:
        with self._lock:
            if self.dead:
                raise self._die()
            self.calls.append(f"{model.service_model.service_name}.{model.name}")
            number = len(self.calls)
            if self.at is not None and number > self.at:
                self.calls_after_fault += 1
        if number != self.at:
            return
        if self.mode == "died-before":
            raise self._die()
        if self.mode == "error-before":
            from botocore.exceptions import EndpointConnectionError

            raise EndpointConnectionError(endpoint_url=f"call {number} ({self.calls[-1]})")

    def _after(self, model, **_: Any) -> None:
        with self._lock:
            hit = len(self.calls) == self.at and self.calls[-1].endswith("." + model.name)
        if not hit:
            return
        if self.mode == "died-after":
            raise self._die()
        if self.mode == "error-after":
            from botocore.exceptions import ConnectionClosedError

            raise ConnectionClosedError(endpoint_url=f"call {self.at} ({self.calls[-1]}), after the store acted")


# -- the store's state ------------------------------------------------------------------

@dataclass(frozen=True)
class Stored:
    body: bytes
    etag: str
    content_type: str
    metadata: dict[str, str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def listing(s3: Any, bucket: str) -> dict[str, str]:
    """``{key: ETag}`` of every object in ``bucket``."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        found.update({obj["Key"]: obj["ETag"] for obj in page.get("Contents", [])})
    return found


def snapshot(s3: Any, bucket: str) -> dict[str, Stored]:
    """Every object of ``bucket`` with what a write back needs."""
    stored = {}
    for key in listing(s3, bucket):
        got = s3.get_object(Bucket=bucket, Key=key)
        stored[key] = Stored(got["Body"].read(), got["ETag"], got.get("ContentType", ""), got.get("Metadata", {}))
    return stored


def restore(s3: Any, bucket: str, saved: Mapping[str, Stored]) -> None:
    """Make ``bucket`` hold ``saved`` again: delete what is new, write back what changed.

    Objects are compared by ETag (their MD5 here, none is multipart): the same bytes
    written again need no write back.
    """
    now = listing(s3, bucket)
    for key in now.keys() - saved.keys():
        s3.delete_object(Bucket=bucket, Key=key)
    for key, item in saved.items():
        if now.get(key) != item.etag:
            s3.put_object(Bucket=bucket, Key=key, Body=item.body, ContentType=item.content_type,
                          Metadata=item.metadata)


@dataclass
class Store:
    """What a check sees: the bucket's keys and ETags now, and the sha256 of every body seen before.

    ``sha256(key)`` answers from the ETag when those bytes were in the starting state or
    written by the clean run, and reads the object only for bytes never seen.
    """

    s3: Any
    bucket: str
    known: dict[str, str]  # ETag -> sha256
    keys: dict[str, str] = field(default_factory=dict)

    def refresh(self) -> "Store":
        self.keys = listing(self.s3, self.bucket)
        return self

    def sha256(self, key: str) -> str | None:
        etag = self.keys.get(key)
        if etag is None:
            return None
        if etag not in self.known:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            self.known[etag] = hashlib.sha256(body).hexdigest()
        return self.known[etag]


# -- the enumeration --------------------------------------------------------------------

@dataclass
class Operation:
    """One operation under enumeration.

    ``prepare(clients)`` builds its starting state in a bucket of its own and returns
    ``(bucket, context)``; ``run(clients, context)`` is the operation as its task calls it;
    ``check(store, context, rerun)`` lists what is inconsistent (empty: nothing), ``rerun``
    saying whether the clean re-run has happened. ``clients()`` makes a client set.
    ``reset(clients, context)``, when given, rebuilds before every run what the bucket's
    snapshot does not hold (it may change ``context``), outside the fault injection.
    """

    name: str
    clients: Callable[[], dict[str, Any]]
    prepare: Callable[[dict[str, Any]], tuple[str, Any]]
    run: Callable[[dict[str, Any], Any], Any]
    check: Callable[[Store, Any, bool], list[str]]
    must_call: str  # the call the operation is about (its pointer write, say): the enumeration must reach it
    reset: Callable[[dict[str, Any], Any], None] | None = None


@dataclass
class Report:
    operation: str
    calls: list[str]
    scenarios: int = 0  # faults run
    equivalent: int = 0  # deaths not run: the error at the same call left the same state
    inconsistent: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"operation": self.operation, "calls": len(self.calls),
                "crash_points": self.scenarios + self.equivalent, "run": self.scenarios,
                "inconsistent_states": len(self.inconsistent)}


def enumerate_crash_points(operation: Operation, modes: Iterable[str] = MODES) -> Report:
    """Every (call, mode) fault of ``operation``, each followed by a clean re-run."""
    clients = operation.clients()
    s3 = clients["s3"]
    bucket, context = operation.prepare(clients)
    saved = snapshot(s3, bucket)
    known = {item.etag: item.sha256 for item in saved.values()}

    if operation.reset:
        operation.reset(clients, context)
    counter = FaultInjector(clients.values())
    try:
        operation.run(clients, context)
    finally:
        counter.remove()
    known.update({item.etag: item.sha256 for item in snapshot(s3, bucket).values()})
    report = Report(operation.name, counter.calls)
    clean = operation.check(Store(s3, bucket, known).refresh(), context, True)
    if clean:  # the enumeration means nothing if a clean run is not consistent
        raise AssertionError(f"{operation.name}: a clean run is inconsistent: {clean}")
    if operation.must_call not in report.calls:
        raise AssertionError(f"{operation.name}: a clean run never called {operation.must_call}: {report.calls}")

    # One client set for the faulted runs and one for the re-runs: a boto3 client keeps
    # nothing between calls but its connections, and making one costs tens of milliseconds.
    faulted, rerun = operation.clients(), operation.clients()
    ended_at_once: set[tuple[int, str]] = set()
    for at, mode in itertools.product(range(1, len(report.calls) + 1), modes):
        where = f"{mode} at call {at} ({report.calls[at - 1]})"
        if (at, SAME_AS.get(mode)) in ended_at_once:
            report.equivalent += 1
            continue
        restore(s3, bucket, saved)
        if operation.reset:
            operation.reset(clients, context)
        injector = FaultInjector(faulted.values(), at, mode)
        try:
            operation.run(faulted, context)
        except (Exception, ProcessDied):
            pass  # the task failed (or its process died): what it left is what is checked
        finally:
            injector.remove()
        if injector.calls_after_fault == 0:
            ended_at_once.add((at, mode))
        report.scenarios += 1
        store = Store(s3, bucket, known)
        report.inconsistent += [f"{where}, before the re-run: {p}" for p in operation.check(store.refresh(), context, False)]
        try:
            operation.run(rerun, context)
        except Exception as error:
            report.inconsistent.append(f"{where}: the re-run failed: {type(error).__name__}: {error}")
            continue
        report.inconsistent += [f"{where}, after the re-run: {p}" for p in operation.check(store.refresh(), context, True)]
    restore(s3, bucket, saved)
    return report


def table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The closing note's table, in Markdown."""
    lines = ["| operation | calls in a clean run | crash points (calls x 4 ways) | of them run | inconsistent states |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['operation']} | {r['calls']} | {r['crash_points']} | {r['run']} | {r['inconsistent_states']} |"
              for r in rows]
    return "\n".join(lines)
