"""Least privilege, proven against moto's IAM enforcement.

``EnforcingMoto`` starts moto's server as its own process with ``INITIAL_NO_AUTH_ACTION_COUNT``
(server-wide, so never the suite's shared server) and a trace of every decision
(``enforcing_moto.py``). Its first three requests make an administrator; everything after
is signed and checked. Then:

(a) ``principal(name, policy)``: a user holding only ``policy``, as keys, boto3 clients or
    the environment of an Airflow run (``airflow_env``);
(b) ``trace(name)``: the (action, resource) pairs moto evaluated for that user, each once;
(c) ``necessity(policy, trace)``: the trace evaluated, with moto's own evaluator, against the
    policy less each statement in turn - which requests each statement alone allows - so
    that one enforced run shows every statement needed, instead of one run per action.

What moto proves and what it cannot: it evaluates action names for every service but
resources only for S3, SQS, IAM and STS (every other request is checked against ``*``:
``headpose.planning.iam.widened`` is the worker policy for such a run), passes a condition whose key
it does not know (``s3:ResourceAccount``), and never evaluates ``iam:PassRole`` (SageMaker
does, server-side) or KMS (moto's S3 stores the key id without asking KMS).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedded import EmbeddedS3, free_port

REGION = "us-east-1"
ADMIN = "headpose-test-admin"
ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
# create_user, put_user_policy, create_access_key: the administrator, made before enforcement starts.
UNCHECKED_REQUESTS = 3


@dataclass
class Principal:
    name: str
    access_key_id: str
    secret_access_key: str
    endpoint: str
    policy: dict[str, Any] = field(repr=False)

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key)

    def airflow_env(self) -> dict[str, str]:
        """The environment of an Airflow process (``airflow dags test`` included) acting as this principal:
        the ``aws_default`` connection holds the keys and points at the enforcing server."""
        connection = {"conn_type": "aws", "login": self.access_key_id, "password": self.secret_access_key,
                      "extra": {"endpoint_url": self.endpoint, "region_name": REGION}}
        return {"AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection), "AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key, "AWS_DEFAULT_REGION": REGION}


class EnforcingMoto(EmbeddedS3):
    """moto's server enforcing IAM, with an administrator and a decision trace."""

    trace_path: Path
    admin: Principal

    @classmethod
    def start_enforcing(cls, trace_path: Path, timeout: float = 60.0) -> "EnforcingMoto":
        port = free_port()
        trace_path.write_text("")
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("enforcing_moto.py")), str(port), str(trace_path)],
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(UNCHECKED_REQUESTS)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        server = cls(process, port)
        server.trace_path = trace_path
        server.wait_ready(timeout)
        iam = Principal("", "unchecked", "unchecked", server.endpoint, {}).client("iam")
        iam.create_user(UserName=ADMIN)
        iam.put_user_policy(UserName=ADMIN, PolicyName="admin", PolicyDocument=json.dumps(ADMIN_POLICY))
        key = iam.create_access_key(UserName=ADMIN)["AccessKey"]
        server.admin = Principal(ADMIN, key["AccessKeyId"], key["SecretAccessKey"], server.endpoint, ADMIN_POLICY)
        return server

    def principal(self, name: str, policy: Mapping[str, Any]) -> Principal:
        """A new user holding only ``policy`` (an inline policy), and its keys."""
        iam = self.admin.client("iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="only", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Principal(name, key["AccessKeyId"], key["SecretAccessKey"], self.endpoint, dict(policy))

    def decisions(self, name: str) -> list[dict[str, Any]]:
        lines = self.trace_path.read_text().splitlines()
        return [entry for entry in map(json.loads, lines) if entry["user"] == name]

    def trace(self, name: str) -> list[tuple[str, str]]:
        """The (action, resource) pairs moto evaluated for ``name``, each once, in first-seen order."""
        return list(dict.fromkeys((d["action"], d["resource"]) for d in self.decisions(name)))

    def denied(self, name: str) -> list[tuple[str, str]]:
        return list(dict.fromkeys((d["action"], d["resource"]) for d in self.decisions(name) if not d["allowed"]))


def allows(policy: Mapping[str, Any], action: str, resource: str) -> bool:
    """moto's own verdict: what its enforcement would answer this request with ``policy`` alone."""
    from moto.iam.access_control import IAMPolicy, PermissionResult

    return IAMPolicy(json.dumps(policy)).is_action_permitted(action, resource) == PermissionResult.PERMITTED


def without(policy: Mapping[str, Any], sid: str) -> dict[str, Any]:
    return {**policy, "Statement": [s for s in policy["Statement"] if s.get("Sid") != sid]}


def necessity(policy: Mapping[str, Any], trace: Iterable[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """``{statement Sid: the traced requests the policy less that statement denies}``.

    A statement with an empty list was not needed by this trace (not exercised by it).
    """
    requests = list(trace)
    return {statement["Sid"]: [r for r in requests if not allows(without(policy, statement["Sid"]), *r)]
            for statement in policy["Statement"]}


def action_necessity(policy: Mapping[str, Any], trace: Iterable[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """``{action: the traced requests the policy less that action (in every statement) denies}``."""
    requests = list(trace)
    actions = dict.fromkeys(a for s in policy["Statement"] for a in _actions(s))
    verdicts = {}
    for action in actions:
        less = {**policy, "Statement": [{**s, "Action": [a for a in _actions(s) if a != action]}
                                        for s in policy["Statement"] if [a for a in _actions(s) if a != action]]}
        verdicts[action] = [r for r in requests if not allows(less, *r)]
    return verdicts


def _actions(statement: Mapping[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def check_enforced_run(server: EnforcingMoto, principal: Principal, *, must_use: Iterable[str] = ()) -> dict[str, Any]:
    """What a run as ``principal`` proved: raises ``AssertionError`` unless every request was allowed, the
    policy allows the whole trace, and each statement in ``must_use`` was needed by it.

    Returns ``{"trace": [...], "needed": {sid: [requests]}, "unused": [sids]}`` for the report.
    """
    trace = server.trace(principal.name)
    assert trace, f"moto evaluated no request of {principal.name}: was the run made with its keys?"
    denied = server.denied(principal.name)
    assert not denied, f"AccessDenied for {principal.name}: {denied}"
    assert all(allows(principal.policy, *request) for request in trace)  # the evaluator agrees with the server
    needed = necessity(principal.policy, trace)
    missing = [sid for sid in must_use if not needed.get(sid)]
    assert not missing, f"statements {missing} were not needed by the run's requests {trace}"
    by_action = action_necessity(principal.policy, trace)
    return {"trace": trace, "needed": needed, "unused": [sid for sid, requests in needed.items() if not requests],
            "unused_actions": [action for action, requests in by_action.items() if not requests]}


def worker_for_dag_run(server: EnforcingMoto, bucket: str, name: str = "headpose-worker") -> Principal:
    """The bucket (made by the administrator, as airflow-init would) and a principal holding only the
    worker policy for it, non-S3 resources widened to ``*`` for moto (``headpose.planning.iam.widened``).

    For a whole ``airflow dags test`` run: give the run ``principal.airflow_env()`` (it replaces
    ``aws_env``/``cli_env``'s connection), then ``check_enforced_run(server, principal,
    must_use=WORKER_STATEMENTS_OF_A_LOCAL_RUN)``.
    """
    from headpose.planning.iam import Deployment, widened, worker_policy

    server.admin.client("s3").create_bucket(Bucket=bucket)
    return server.principal(name, widened(worker_policy(Deployment(bucket=bucket, folder="headpose", region=REGION,
                                                                   account=MOTO_ACCOUNT))))


# moto's account: it owns every bucket it creates (s3:ResourceAccount).
MOTO_ACCOUNT = "123456789012"
# What a local-backend DAG run needs of the worker policy; the SageMaker, PassRole and log
# statements serve backend=sagemaker, CreateBucket serves airflow-init.
WORKER_STATEMENTS_OF_A_LOCAL_RUN = ("ListAndLocateTheBucket", "DatasetsCodeArtifactsAndThePublishedModel")
