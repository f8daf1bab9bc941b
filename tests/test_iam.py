"""Least privilege: the IAM documents lint clean, and are sufficient and needed under moto's enforcement.

One enforcing moto server (its own process: ``iam_support``) serves the module. Each
enforced run is made once; its trace shows the policy sufficient (nothing denied) and
each statement needed (the policy less it denies some traced request), and one replay
per needed statement, as a principal without it, gets moto's own AccessDenied.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import textwrap

import pytest
from botocore.exceptions import ClientError

from headpose.planning import iam
from iam_support import (
    MOTO_ACCOUNT, WORKER_STATEMENTS_OF_A_LOCAL_RUN, EnforcingMoto, check_enforced_run, necessity, without,
    worker_for_dag_run,
)
from support import ROOT

BUCKET = "headpose-governed"
KEY = f"arn:aws:kms:us-east-1:{MOTO_ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
GOVERNED = iam.Deployment(BUCKET, "headpose", "us-east-1", MOTO_ACCOUNT, "deeplens-TF-headpose",
                          "HeadposeSageMakerExecution", KEY, True)
DOCUMENTS = {"airflow-principal-policy.json": iam.worker_policy,
             "sagemaker-execution-role-policy.json": iam.execution_role_policy,
             "new-data-queue-policy.json": iam.new_data_queue_policy, "device-policy.json": iam.device_policy}


@pytest.fixture(scope="module")
def enforcing(tmp_path_factory):
    server = EnforcingMoto.start_enforcing(tmp_path_factory.mktemp("iam") / "trace.jsonl")
    yield server
    server.stop()


# -- the documents ---------------------------------------------------------------------

def test_the_shipped_documents_are_the_generators_with_placeholders():
    for name, make in DOCUMENTS.items():
        assert json.loads((ROOT / "deploy" / "iam" / name).read_text()) == make(iam.Deployment()), name
    assert json.loads((ROOT / "deploy/iam/sagemaker-execution-role-trust.json").read_text()) == iam.trust_policy()


PLAIN = iam.Deployment(BUCKET, "headpose", "eu-west-1", MOTO_ACCOUNT, "deeplens-TF-headpose", "HeadposeSageMakerExecution")


# publish creates a Greengrass component: the worker may create and read back its versions.
EDGE = dataclasses.replace(PLAIN, greengrass_component="com.headpose.EdgeClient")


@pytest.mark.parametrize("deployment", [PLAIN, GOVERNED, EDGE], ids=["plain", "kms-and-object-lock", "greengrass"])
@pytest.mark.parametrize("make", [iam.worker_policy, iam.execution_role_policy, iam.new_data_queue_policy],
                         ids=["worker", "execution-role", "new-data-queue"])
def test_parliament_finds_nothing_against_awss_own_definitions(deployment, make):
    from parliament import analyze_policy_string

    findings = analyze_policy_string(json.dumps(make(deployment))).findings
    assert [(f.issue, f.detail) for f in findings] == []


def test_the_trust_policy_is_linted_too():
    from parliament import analyze_policy_string

    # parliament lints identity policies; a trust policy must have no Resource (IAM refuses one),
    # which is the one thing it says about it.
    findings = analyze_policy_string(json.dumps(iam.trust_policy())).findings
    assert [(f.issue, f.detail) for f in findings] == [
        ("MALFORMED", "Statement contains neither Resource nor NotResource")]


def test_the_new_data_statements_are_there_only_with_a_queue():
    with_queue, without = iam.worker_policy(PLAIN), iam.worker_policy(iam.Deployment(**{**PLAIN.__dict__, "new_data_queue": None}))
    added = {s["Sid"] for s in with_queue["Statement"]} - {s["Sid"] for s in without["Statement"]}
    assert added == {"WatchTheNewDataQueue", "SetUpTheNewDataQueue", "NotifyTheQueueOfUploads"}
    queue = iam.new_data_queue_policy(PLAIN)["Statement"][0]
    assert queue["Condition"]["ArnEquals"]["aws:SourceArn"] == f"arn:aws:s3:::{BUCKET}"  # this bucket's uploads only


def test_kms_and_the_bucket_owner_are_in_the_policies_where_configured():
    for make in (iam.worker_policy, iam.execution_role_policy):
        governed, plain = make(GOVERNED), make(iam.Deployment())
        assert any(KEY == s["Resource"] for s in governed["Statement"])
        assert not any("kms:" in json.dumps(s["Action"]) for s in plain["Statement"])
        for statement in governed["Statement"]:  # every S3 statement but CreateBucket names the owner
            if statement["Action"][0].startswith("s3:") and statement["Action"] != ["s3:CreateBucket"]:
                assert statement["Condition"]["StringEquals"]["s3:ResourceAccount"] == MOTO_ACCOUNT, statement


# -- the execution role's S3 part, as a principal holding only it -----------------------

PROGRAM = textwrap.dedent("""
    import os
    from pathlib import Path
    # Reads its channel as the entry point does, writes a model as SageMaker's contract says.
    assert sorted(os.listdir(os.environ["SM_CHANNEL_TRAINING"])) == ["manifest.json", "train-00000.tfrecord"]
    Path(os.environ["SM_MODEL_DIR"], "export").mkdir()
    Path(os.environ["SM_MODEL_DIR"], "export", "model.txt").write_text("weights")
    print("metric: eval_loss=0.5000 eval_accuracy=0.7500", flush=True)
""")


def _code() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("train.py")
        info.size = len(PROGRAM.encode())
        tar.addfile(info, io.BytesIO(PROGRAM.encode()))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def execution_role_run(enforcing, tmp_path_factory):
    """One local-backend job whose every S3 call is made as the execution role's S3 part alone."""
    from headpose.backends.local import run_local_training_job
    from headpose.planning.layout import RunLayout, split_s3_uri
    from headpose.planning.request import training_job_request
    from headpose.planning.rules import validate_run_params

    admin = enforcing.admin.client("s3")
    admin.create_bucket(Bucket=BUCKET)
    layout = RunLayout.for_run(BUCKET, "headpose", "deeplens-TF-headpose-2025-01-06-03-00-00-000",
                               f"s3://{BUCKET}/headpose/datasets/tiny/")
    _, prefix = split_s3_uri(layout.dataset_prefix)
    for name in ("train-00000.tfrecord", "manifest.json"):  # what stage_dataset leaves, as the workers
        admin.put_object(Bucket=BUCKET, Key=prefix + name, Body=name.encode())
    code = _code()  # once: gzip stamps the time, so two calls a second apart differ
    admin.put_object(Bucket=BUCKET, Key=split_s3_uri(layout.sourcedir_uri)[1], Body=code)
    role = enforcing.principal("headpose-execution-role", iam.s3_part(iam.execution_role_policy(GOVERNED)))
    request = training_job_request(layout, validate_run_params({"s3_bucket": BUCKET}), "image", region="us-east-1")
    result = run_local_training_job(request, role.client("s3"), tmp_path_factory.mktemp("opt-ml"), print,
                                    sourcedir_sha256=hashlib.sha256(code).hexdigest())
    return {"role": role, "result": result, "proof": check_enforced_run(
        enforcing, role, must_use=("ReadTheDatasetAndTheCode", "ListTheChannel",
                                   "WriteTheModelOutputDataAndSpotCheckpoints"))}


def test_the_execution_roles_s3_statements_are_sufficient_and_each_needed(execution_role_run):
    proof = execution_role_run["proof"]
    assert execution_role_run["result"]["TrainingJobStatus"] == "Completed"
    # Only the TensorFlow image's bucket-location call (an S3 model_dir: the pipeline sends none) is unused.
    assert proof["unused"] == ["LocateTheBucket"] and proof["unused_actions"] == ["s3:GetBucketLocation"]
    actions = {action for action, _ in proof["trace"]}
    assert actions == {"s3:GetObject", "s3:ListBucket", "s3:PutObject"}, proof["trace"]


def _replay(principal, action: str, resource: str) -> None:
    """The S3 request moto evaluated as (action, resource), made again by ``principal``."""
    bucket, _, key = resource.removeprefix("arn:aws:s3:::").partition("/")
    s3 = principal.client("s3")
    calls = {"s3:GetObject": lambda: s3.get_object(Bucket=bucket, Key=key),
             "s3:PutObject": lambda: s3.put_object(Bucket=bucket, Key=key, Body=b"replayed"),
             "s3:ListBucket": lambda: s3.list_objects_v2(Bucket=bucket, Prefix="headpose/")}
    calls[action]()


def test_without_any_one_needed_statement_moto_answers_access_denied(enforcing, execution_role_run):
    role = execution_role_run["role"]
    for sid, requests in execution_role_run["proof"]["needed"].items():
        if not requests:
            continue
        less = enforcing.principal(f"without-{sid}"[:64], without(role.policy, sid))
        with pytest.raises(ClientError, match="AccessDenied"):
            _replay(less, *requests[0])
        _replay(role, *requests[0])  # the whole policy allows it: the statement made the difference


# -- the worker policy, helpers for the whole-DAG run ------------------------------------

def test_the_train_task_as_the_worker_principal(enforcing, monkeypatch, tmp_path):
    """The sagemaker path of ``train`` (moto's SageMaker) with only the worker policy, widened for moto."""
    import airflow_support  # noqa: F401  (a throw-away AIRFLOW_HOME before airflow is imported)
    from headpose.backends.sourcedir import package_code
    from headpose.planning.plan import plan_run
    from test_sagemaker_backend import LOGICAL, RecordingTaskInstance, _operator

    worker = worker_for_dag_run(enforcing, "headpose-worker-bucket")
    for name, value in worker.airflow_env().items():
        monkeypatch.setenv(name, value)
    plan = plan_run({"backend": "sagemaker", "s3_bucket": "headpose-worker-bucket",
                     "role_arn": f"arn:aws:iam::{MOTO_ACCOUNT}:role/HeadposeSageMakerExecution"},
                    LOGICAL, region="us-east-1", dag_id="headpose_retraining", run_id="r")
    s3 = worker.client("s3")
    s3.put_object(Bucket="headpose-worker-bucket", Key="headpose/datasets/" + plan["dataset_prefix"].rsplit("/", 2)[1]
                  + "/train-00000.tfrecord", Body=b"x")
    code = package_code(s3, plan["sourcedir_uri"], tmp_path)  # package_code's write, as the worker
    result = _operator(plan["training_request"], sourcedir_sha256=code["sha256"],
                       expected_bucket_owner=MOTO_ACCOUNT).execute({"ti": RecordingTaskInstance()})
    assert result["training_job_status"] == "Completed"
    proof = check_enforced_run(enforcing, worker, must_use=(
        "StartWatchAndStopTheRunsTrainingJobs", *WORKER_STATEMENTS_OF_A_LOCAL_RUN))
    assert {"sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob"} <= {a for a, _ in proof["trace"]}
    # PassRole is SageMaker's own check (moto makes none), CreateBucket airflow-init's, logs the log tail's.
    assert {"HandTheExecutionRoleToSageMaker", "CreateTheBucketAtStart", "TheJobsLogInTheTaskLog"} <= set(
        proof["unused"])


def test_making_a_locked_version_as_the_worker_principal(enforcing):
    """upload_frozen_model's calls - the conditional-write probe, Object Lock, SSE-KMS copies - with only
    the worker policy of a deployment that sets object_lock_days and kms_key_id."""
    from headpose.planning.s3_calls import encrypt_with_kms, pin_bucket_owner
    from headpose.registry.versions import make_version
    from test_store_checks import _candidate, _plan

    bucket = "headpose-store"  # test_store_checks' plan names it
    enforcing.admin.client("s3").create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    deployment = iam.Deployment(bucket, "headpose", "us-east-1", MOTO_ACCOUNT, "deeplens-TF-headpose",
                                "HeadposeSageMakerExecution", KEY, object_lock=True)
    worker = enforcing.principal("headpose-publisher", iam.widened(iam.worker_policy(deployment)))
    s3 = encrypt_with_kms(pin_bucket_owner(worker.client("s3"), MOTO_ACCOUNT), KEY)
    plan = _plan(object_lock_days=1)
    frozen, report = _candidate(s3, plan)
    version = make_version(s3, plan, frozen, report)
    assert set(version["files"]) == {"frozen_model.pb", "frozen_model.json", "report.json", "confusion_matrix.png"}
    # (S3 answers a HEAD of a missing key 403 instead of 404 without s3:ListBucket; moto does not.)
    proof = check_enforced_run(enforcing, worker, must_use=(
        "LockThePublishedVersions", "LockThePublishedVersionFiles", "DatasetsCodeArtifactsAndThePublishedModel"))
    assert {"s3:DeleteObject", "s3:PutObjectRetention"} <= {a for a, _ in proof["trace"]}  # the probe, the lock


def test_the_trace_is_evaluated_per_statement_without_a_rerun():
    policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "Read", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::b/k/*"},
        {"Sid": "ReadAll", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::b/*"},
        {"Sid": "Write", "Effect": "Allow", "Action": ["s3:PutObject"], "Resource": "arn:aws:s3:::b/*"},
    ]}
    trace = [("s3:GetObject", "arn:aws:s3:::b/k/1"), ("s3:PutObject", "arn:aws:s3:::b/o")]
    # Read is shadowed by ReadAll: neither alone is needed, which is what a reviewer must see.
    assert necessity(policy, trace) == {"Read": [], "ReadAll": [], "Write": [("s3:PutObject", "arn:aws:s3:::b/o")]}



def test_the_model_registry_as_the_worker_principal(enforcing):
    """approve_release's and publish's Model Registry calls (moto's SageMaker) with only the worker policy:
    its two Model Registry statements suffice and each is needed (actions only: moto checks SageMaker
    requests against ``*``, so the worker policy is widened for it)."""
    from headpose.registry.model_packages import APPROVED, PENDING, ModelRegistry, sync_package

    worker = worker_for_dag_run(enforcing, "headpose-registry", name="headpose-registrar")
    prefix = f"s3://headpose-registry/headpose/TFartifacts/{'deeplens-TF-headpose-2025-01-06-03-00-00-000'}/output/"
    record = {"version": 3, "training_job_name": "deeplens-TF-headpose-2025-01-06-03-00-00-000",
              "model_artifact_uri": prefix + "model.tar.gz", "channel_order": "bgr",
              "files": {"frozen_model.pb": {"uri": prefix + "frozen_model.pb", "sha256": "ab"},
                        "report.json": {"uri": prefix + "report.json", "sha256": "cd"}}}

    def register(principal) -> None:
        registry = ModelRegistry(principal.client("sagemaker"), "headpose", lambda: "tensorflow-inference:2.20-cpu")
        sync_package(registry, record, PENDING, "a person is asked")
        sync_package(registry, record, APPROVED, "published", published={"uri": prefix + "h.json", "sha256": "ef"})

    register(worker)
    proof = check_enforced_run(enforcing, worker, must_use=("RegisterEveryVersionInTheModelRegistry",
                                                            "FindAVersionsPackage"))
    assert {action for action, _ in proof["trace"]} == {
        "sagemaker:DescribeModelPackageGroup", "sagemaker:CreateModelPackageGroup", "sagemaker:ListModelPackages",
        "sagemaker:CreateModelPackage", "sagemaker:UpdateModelPackage"}
    less = enforcing.principal("headpose-registrar-less",
                               without(worker.policy, "RegisterEveryVersionInTheModelRegistry"))
    with pytest.raises(ClientError, match="AccessDenied"):
        register(less)


@pytest.mark.e2e
def test_a_whole_dag_run_as_the_worker_principal(dag_batch):
    """The batch's "least privilege" run - staging its data, training on the local backend, freezing,
    validating, publishing - made with only the worker policy (non-S3 resources widened to ``*``,
    as moto checks those against ``*``): nothing denied, both S3 statements needed, and the policy
    less either one is refused by moto itself on a request the run made."""
    from dag_batch import BY_NAME

    scenario = BY_NAME["least privilege"]
    result = dag_batch.run(scenario.name)
    assert result.exit_code == 0, result.output[-3000:]
    server, worker = dag_batch.enforcing, dag_batch.worker
    proof = check_enforced_run(server, worker, must_use=WORKER_STATEMENTS_OF_A_LOCAL_RUN)
    published = worker.client("s3").get_object(Bucket=scenario.bucket, Key="headpose/published/latest.json")
    assert json.loads(published["Body"].read())["training_job_name"] == scenario.job
    actions = {action for action, _ in proof["trace"]}
    assert {"s3:PutObject", "s3:GetObject", "s3:ListBucket"} <= actions, proof["trace"]
    for sid in WORKER_STATEMENTS_OF_A_LOCAL_RUN:
        s3_requests = [request for request in proof["needed"][sid] if request[0] in {"s3:GetObject", "s3:ListBucket"}]
        if not s3_requests:
            continue
        less = server.principal(f"worker-without-{sid}"[:64], without(worker.policy, sid))
        with pytest.raises(ClientError, match="AccessDenied"):
            _replay(less, *s3_requests[0])


# -- an edge device: the channels and its own report ----------------------------------------

def rendered_device_policy(deployment: iam.Deployment, thing: str) -> dict:
    """The device policy as IAM evaluates it for ``thing``: moto (and parliament) do not expand
    ``${credentials-iot:ThingName}``, AWS does, from the IoT credentials provider's session."""
    return json.loads(json.dumps(iam.device_policy(deployment)).replace(iam.THING_NAME, thing))


@pytest.mark.parametrize("deployment", [PLAIN, GOVERNED], ids=["plain", "kms"])
def test_the_device_policy_lints_clean_and_scopes_the_report_by_thing_name(deployment):
    from parliament import analyze_policy_string

    findings = analyze_policy_string(json.dumps(rendered_device_policy(deployment, "cam-1"))).findings
    assert [(f.issue, f.detail) for f in findings] == []
    writes = [s for s in iam.device_policy(deployment)["Statement"] if "s3:PutObject" in s["Action"]]
    assert [w["Resource"] for w in writes] == [
        f"arn:aws:s3:::{BUCKET}/headpose/devices/${{credentials-iot:ThingName}}/status.json"]


def test_a_device_writes_its_own_report_only_and_moves_no_pointer(enforcing, monkeypatch):
    from headpose.edge.reporting import Reporter

    admin = enforcing.admin.client("s3")
    bucket = "headpose-devices"
    admin.create_bucket(Bucket=bucket)
    admin.put_object(Bucket=bucket, Key="headpose/published/channels/canary.json", Body=b"{}")
    deployment = iam.Deployment(bucket, "headpose", "us-east-1", MOTO_ACCOUNT)
    device = enforcing.principal("cam-1", rendered_device_policy(deployment, "cam-1"))
    s3 = device.client("s3")
    assert s3.get_object(Bucket=bucket, Key="headpose/published/channels/canary.json")["Body"].read() == b"{}"
    s3.put_object(Bucket=bucket, Key="headpose/devices/cam-1/status.json", Body=b"{}")
    for key in ("headpose/devices/cam-2/status.json", "headpose/published/channels/canary.json",
                "headpose/published/channels/stable.json"):
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.put_object(Bucket=bucket, Key=key, Body=b"{}")
    # The edge client's reporter, denied, stops reporting after one line and never raises.
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": device.access_key_id, "AWS_SECRET_ACCESS_KEY": device.secret_access_key,
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # an earlier test's session keeps its credentials
    lines: list[str] = []
    reporter = Reporter(f"s3://{bucket}/headpose/devices/cam-2/status.json", enforcing.endpoint, log=lines.append)
    assert reporter.put({"device_id": "cam-2"}) is False and reporter.put({"device_id": "cam-2"}) is False
    assert not reporter.enabled and len(lines) == 1 and "reporting stopped" in lines[0]
    own = Reporter(f"s3://{bucket}/headpose/devices/cam-1/status.json", enforcing.endpoint, log=lines.append)
    assert own.put({"device_id": "cam-1"}) is True
