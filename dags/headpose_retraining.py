"""
### Head-pose retraining

Trains the head-pose ResNet (9 classes: pan bin x tilt bin) the way the original
SageMaker tutorial did, freezes it into `frozen_model.pb`, judges it on the deployment's
evaluation set against the published model and publishes it for edge devices - one task
per step:

`plan_run` -> `claim_data_version` -> `stage_dataset` -> `package_code` -> `train` -> `download_artifact` ->
`freeze_graph` -> `export_edge_models` -> `validate_model` -> `upload_frozen_model` -> `approve_release` ->
`publish` (and `record_release`) -> `record_data_version` -> `cleanup`

* **plan_run** checks every parameter and rule across them (nothing is written before),
  derives the run's `training_job_name` (`<base_job_name>-<logical time>`, the same on a
  retry), every S3 URI and the CreateTrainingJob request; XCom carries them on. A run started
  by new data trains on the uploaded object its asset event names.
* **claim_data_version** claims the run's data version (the data's sha256 with the settings
  that shape the dataset and the model) in `data-versions/<id>.json`; a version already trained
  (published or refused) is not trained again - every later task is skipped and the log says
  why - unless the trigger says `force_retrain`. **record_data_version** records the outcome.
* **stage_dataset** makes or finds the dataset and validates it (checksums, counts, all 9
  classes, shapes, pixels) before anything trains on it.
* **train** runs that request on SageMaker (`backend=sagemaker`) or on the worker
  (`backend=local`). A job that fails for lack of capacity, or that a person clears `train`
  after, is followed by one new job `<job>-2`, ... (`max_training_attempts`).
* **validate_model** scores the frozen graph and the published model (the champion) on the
  same images - the pinned evaluation set when the deployment names one; below
  `min_accuracy` or `min_class_recall` it fails, and its report lands under the run's
  `rejected/` prefix.
* **approve_release** asks a person (UI, REST API) where the deployment requires it and `publish`
  would promote; Reject or no answer skips `publish` (**record_release** keeps the answer).
* **publish** promotes the new model only if, paired with the champion on the same images, it
  passes `promotion_rule` (or `force_publish` is set); otherwise it is **skipped** (the run stays
  green, the reason is in its log and XCom `summary`). The Model Registry follows the pointer.

#### Operating
* Tasks hand files to each other through S3 (names, URIs and sha256s in XCom), so any task
  can be cleared and run again alone, on any worker, even after the run failed.
* Schedule: `$HEADPOSE_SCHEDULE` (default `@weekly`, `none` = manual only), one run at a
  time, no catch-up. A scheduled run uses the deployment profile (`$HEADPOSE_RUN_DEFAULTS`).
  With the profile's `retrain_on` = `data` or `either`, an upload under `new_data_prefix`
  (the asset `headpose_training_data`, watched through `new_data_queue`) starts a run too.
* A failure logs one line `HEADPOSE FAILURE ... task=... training_job_name=... reason=...`
  (`$HEADPOSE_NOTIFIER` can forward it, e.g. to Slack; see `headpose_operators.notify`).
* Every run's summary (job, accuracy before/after, the comparison, the approval, billable
  seconds, where the model went) is in **publish**'s log and XCom `summary` (refused: **record_release**'s).
* Roll back: `python -m headpose.registry --bucket <bucket> rollback [--to <training_job_name>]`.
"""
from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import Asset, Param, chain, dag, get_current_context, task, teardown
# Named here, though only the operators use them, because the DAG processor pre-imports
# the airflow.* modules a DAG file names once, before it forks a parser per file; without
# these lines every parse re-imports boto3/botocore (bench/bench_parse.py: 1.36x -> 0.79x).
import airflow.providers.amazon.aws.hooks.s3  # noqa: F401,E402
import airflow.providers.amazon.aws.operators.sagemaker  # noqa: F401,E402

try:
    import headpose  # noqa: F401
except ImportError:  # a checkout run without PYTHONPATH=include: the package sits beside dags/
    sys.path.append(str(Path(__file__).resolve().parents[1] / "include"))

from headpose.planning import scheduling  # noqa: E402
from headpose.planning.params import param_schemas  # noqa: E402
from headpose.planning.profile import load_profile  # noqa: E402
from headpose_operators import (  # noqa: E402
    ClaimDataVersionOperator, ExportEdgeModelsOperator, FreezeGraphOperator, HeadposeTrainingOperator,
    RecordDataVersionOperator, RecordReleaseOperator, ReleaseApprovalOperator,
)
from headpose_operators.approval import APPROVAL_KEY  # noqa: E402
from headpose_operators.new_data import dag_schedule, training_data_asset  # noqa: E402
from headpose_operators.notify import failure_notifier, run_alert  # noqa: E402

DAG_ID = "headpose_retraining"
AWS_CONN_ID = "aws_default"
# The bucket is a run parameter, so the asset is named rather than addressed; each
# event's extra carries the pointer's actual URI and the training job name.
PUBLISHED_MODEL = Asset(name="headpose_frozen_model")


def _params() -> dict[str, Param]:
    params = {}
    for name, spec in param_schemas().items():
        schema = dict(spec)
        default, description = schema.pop("default"), schema.pop("description")
        params[name] = Param(default, description=description, **schema)
    return params


def _schedule():
    """The cron, uploads of new data, or either, as the profile's ``retrain_on`` says."""
    settings = load_profile().settings
    data = training_data_asset(settings.new_data_prefix, settings.new_data_queue, AWS_CONN_ID,
                               scheduling.new_data_poll_seconds()) if settings.watches_new_data else None
    return dag_schedule(scheduling.schedule(), settings.retrain_on, data)


@dag(
    dag_id=DAG_ID,
    schedule=_schedule(),
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=scheduling.dagrun_timeout(),
    params=_params(),
    # Timeouts and retries are per task: scheduling.task_args(<task_id>).
    default_args={"owner": scheduling.owner(), "on_failure_callback": failure_notifier()},
    # One alert per failed run (it also catches run timeouts); each task only logs its line.
    on_failure_callback=run_alert(),
    tags=["headpose", "sagemaker", "tensorflow"],
    description="Retrains the head-pose ResNet, freezes, validates and publishes it for edge devices",
    doc_md=__doc__ + "\n#### In force\n" + load_profile().describe() + "\n",
)
def headpose_retraining():
    @task(multiple_outputs=True, **scheduling.task_args("plan_run"))
    def plan_run() -> dict:
        """Validates the trigger parameters against the deployment profile, derives
        `training_job_name` (`<base_job_name>-<logical time>`, the same on every retry), every
        S3 URI of the run and the CreateTrainingJob request. No AWS calls, nothing written.
        Fails (no retry) on bad parameters: the message lists every problem. A run started by
        new data trains on the upload its asset events name (the others are listed)."""
        from headpose.planning.new_data import start_lines
        from headpose.planning.params import CONNECTION_ROLE_EXTRA
        from headpose.planning.plan import plan_run as make_plan
        from headpose.planning.rules import RunParamsError
        from headpose_operators.s3 import OWNER_EXTRA

        context = get_current_context()
        dag_run = context["dag_run"]
        hook = _s3_hook()
        extra = hook.conn_config.extra_config
        try:
            plan = make_plan(
                dict(context["params"]), dag_run.logical_date or dag_run.run_after,
                region=hook.conn_region_name or "us-east-1", dag_id=DAG_ID, run_id=dag_run.run_id,
                dagrun_timeout=context["dag"].dagrun_timeout,
                connection_role=extra.get(CONNECTION_ROLE_EXTRA), connection_owner=extra.get(OWNER_EXTRA),
                run_type=str(getattr(dag_run.run_type, "value", dag_run.run_type)),
                triggered_by=getattr(dag_run, "triggering_user_name", None),
                new_data_events=[dict(event.extra) for event in dag_run.consumed_asset_events or []],
            )
        except RunParamsError as error:
            raise _fail(str(error)) from None
        print("\n".join(start_lines(plan)))
        print(plan["profile"])
        print(f"training_job_name: {plan['training_job_name']}")
        return plan

    @task(**scheduling.task_args("stage_dataset"))
    def stage_dataset(plan: dict) -> dict:
        """Puts the run's dataset under `datasets/<id>/` in S3 (a synthetic or Prima dataset
        staged before with the same settings is reused), or takes a given prefix; validates
        it either way and refuses it with the figures if a check fails. Retries S3 errors."""
        from headpose.datasets.staging import stage_dataset as stage
        from headpose.datasets.store import DatasetError
        from headpose.planning.layout import task_scratch

        try:
            with task_scratch(plan["training_job_name"], "stage_dataset") as scratch:
                return stage(_s3(plan), plan, print, scratch_root=scratch)
        except DatasetError as error:
            raise _fail(str(error)) from None

    @task(**scheduling.task_args("package_code"))
    def package_code(plan: dict) -> dict:
        """Packs the training entry point (`include/headpose/training`) into
        `customTFcodes/<job>/source/sourcedir.tar.gz`, where the training request names it,
        and records its sha256 for `train` to check."""
        from headpose.backends.sourcedir import package_code as pack_and_upload
        from headpose.planning.layout import task_scratch

        with task_scratch(plan["training_job_name"], "package_code") as scratch:
            return pack_and_upload(_s3(plan), plan["sourcedir_uri"], scratch)

    @task(multiple_outputs=True, **scheduling.task_args("download_artifact"))
    def download_artifact(plan: dict, training: dict) -> dict:
        """Downloads the job's `TFartifacts/<job>/output/model.tar.gz`, checks it against the
        local backend's record and records its sha256, which every later reader checks.
        S3 errors retry with backoff; a checksum mismatch fails at once."""
        from headpose.planning.handoff import HandoffError, verify_model_artifact
        from headpose.planning.layout import RunLayout, task_scratch

        layout = RunLayout.from_dict(plan).for_job(training["training_job_name"])
        try:
            with task_scratch(plan["training_job_name"], "download_artifact") as scratch:
                artifact = verify_model_artifact(_s3(plan), training["Training"], layout.model_artifact_uri, scratch)
        except HandoffError as error:
            raise _fail(str(error)) from None
        return {**artifact, "candidate_prefix": layout.candidate_prefix}

    @task(**scheduling.task_args("validate_model"))
    def validate_model(plan: dict, dataset: dict, artifact: dict, frozen: dict, edge: dict) -> dict:
        """Scores the frozen graph on the evaluation set (the deployment's pinned one, else the
        run's eval split): accuracy, every class's recall, confusion matrix, parity with the
        SavedModel; scores the published model (the champion) on the same images for
        `publish`. Fails below `min_accuracy` / `min_class_recall`, on parity, or for a graph
        that breaks the contract; the report then lands under the run's `rejected/` prefix.
        Runs every edge format in its own runtime on the same images; a format that misses
        its tolerance is withheld, the others still are published."""
        from headpose.artifacts.acceptance import ModelRefused
        from headpose.planning.layout import task_scratch
        from headpose.registry.evaluation import validate_candidate

        try:
            with task_scratch(plan["training_job_name"], "validate_model") as scratch:
                outcome = validate_candidate(_s3(plan), plan, dataset, artifact, frozen, scratch, print, edge)
        except ModelRefused as error:
            if error.evidence:  # the refused model's report and matrix, one click from the UI
                get_current_context()["ti"].xcom_push(key="links", value=_links(plan, error.evidence))
            raise _fail(str(error)) from None
        return {**outcome, "links": _links(plan, {"report": outcome["report_uri"],
                                                   "report_page": outcome["report_html_uri"],
                                                   "confusion_matrix": outcome["confusion_png_uri"]})}

    @task(**scheduling.task_args("upload_frozen_model"))
    def upload_frozen_model(plan: dict, frozen: dict, report: dict, edge: dict) -> dict:
        """Copies the accepted model - `frozen_model.pb`, `frozen_model.json`, `report.json`,
        `confusion_matrix.png` and the edge formats that passed - to `TFartifacts/<job>/output/`,
        beside `model.tar.gz`: the immutable version `publish` points at. Nothing under
        `published/` changes here."""
        from headpose.registry.pointer import PublishError
        from headpose.registry.versions import make_version

        try:
            return make_version(_s3(plan), plan, frozen, report, edge)
        except PublishError as error:
            raise _fail(str(error)) from None

    @task(outlets=[PUBLISHED_MODEL], **scheduling.task_args("publish"))
    def publish(plan: dict, training: dict, dataset: dict, report: dict, version: dict) -> dict:
        """Promotes the new version if it passes `promotion_rule` against the published one (or `force_publish`)
        and, where required, a person approved it: history record, pointer (conditional on the one compared with),
        mirror, Model Registry, Greengrass component. Otherwise **skipped**, nothing under `published/` changes;
        the log and XCom `summary` hold the run summary either way."""
        from airflow.sdk.exceptions import AirflowSkipException

        from headpose.registry.pointer import PublishError
        from headpose.registry.promotion import publish_run
        from headpose.registry.summary import format_summary
        from headpose_operators.greengrass import greengrass_component
        from headpose_operators.sagemaker import model_registry

        context = get_current_context()
        try:
            decision, summary = publish_run(
                _s3(plan), plan, training, dataset, report, version, dag_id=DAG_ID, run_id=context["dag_run"].run_id,
                approval=context["ti"].xcom_pull(task_ids="approve_release", key=APPROVAL_KEY),
                model_registry=model_registry(AWS_CONN_ID, plan), greengrass=greengrass_component(AWS_CONN_ID, plan),
            )
        except PublishError as error:  # the published state itself is wrong: a person must look
            raise _fail(str(error)) from None
        summary["links"] = _links(plan, {"pointer": plan["published_pointer_uri"],
                                         "model": summary.get("published_model_uri")})
        print(format_summary(summary))
        context["ti"].xcom_push(key="summary", value=summary)
        if not decision.promote:
            # Skipped, not failed: the run worked and the published model is the better one.
            # A skip also emits no asset event, so nothing downstream reloads an unchanged model.
            raise AirflowSkipException(f"not published: {decision.reason}")
        context["outlet_events"][PUBLISHED_MODEL].extra = {
            "uri": summary["published_pointer_uri"], "training_job_name": summary["training_job_name"],
        }
        return summary

    @teardown
    @task(**scheduling.task_args("cleanup"))
    def cleanup() -> None:
        """Removes what the run left in this worker's scratch (a killed try's files). Nothing
        in S3 is removed: a cleared task reads its inputs from there. As a teardown it cannot
        turn a failed run green."""
        from headpose.planning.layout import remove_run_workspace

        job = get_current_context()["ti"].xcom_pull(task_ids="plan_run", key="training_job_name")
        if job:
            remove_run_workspace(job)

    plan = plan_run()
    claim = ClaimDataVersionOperator(task_id="claim_data_version", plan=plan, aws_conn_id=AWS_CONN_ID,
                                     **scheduling.task_args("claim_data_version"))
    dataset = stage_dataset(plan)
    code = package_code(plan)
    train = HeadposeTrainingOperator(
        task_id="train",
        config=plan["training_request"],
        backend="{{ params.backend }}",
        sourcedir_sha256=code["sha256"],
        source_sha256s=code["files"],
        manifest_sha256=dataset["manifest_sha256"],
        max_training_attempts="{{ ti.xcom_pull(task_ids='plan_run', key='run_params')['max_training_attempts'] }}",
        expected_bucket_owner=plan["expected_bucket_owner"],
        kms_key_id=plan["kms_key_id"],
        aws_conn_id=AWS_CONN_ID,
        print_log=True,
        check_interval=scheduling.training_poll_seconds(),
        doc_md="Runs the CreateTrainingJob request from `plan_run` on SageMaker (`backend=sagemaker`) or "
        "on the worker (`backend=local`), writing `TFartifacts/<job>/output/model.tar.gz`, after checking "
        "that `sourcedir.tar.gz` is still the code `package_code` packed. A retry never starts a second "
        "job while one runs: it finds the one of its `training_job_name`. After a capacity or internal "
        "failure, or when a person clears this task after a failed or stopped job, it starts "
        "`<job>-2`, `<job>-3` (up to `max_training_attempts`). Its timeout is the request's max run (or "
        "spot wait) time plus one hour.",
        # The timeout given here is the parse-time ceiling; the operator sets the run's own
        # from its request before it executes.
        **scheduling.task_args("train"),
    )
    artifact = download_artifact(plan, train.output)
    freeze = FreezeGraphOperator(
        task_id="freeze_graph",
        training_job_name=artifact["training_job_name"],
        artifact_uri=artifact["artifact_uri"],
        artifact_sha256=artifact["sha256"],
        output_prefix=artifact["candidate_prefix"],
        channel_order=dataset["channel_order"],
        aws_conn_id=AWS_CONN_ID,
        expected_bucket_owner=plan["expected_bucket_owner"],
        kms_key_id=plan["kms_key_id"],
        multiple_outputs=True,  # export_edge_models takes single keys of its result
        doc_md="Safely extracts `model.tar.gz` (no `..`, absolute paths, links out, oversized "
        "members), finds its one `export/*/<ts>` SavedModel and freezes it into `frozen_model.pb` "
        "(input `inputs`, output `softmax_tensor`) + `frozen_model.json`, uploaded to the run's "
        "`candidate/` prefix. A refused archive or model fails the task without retrying.",
        **scheduling.task_args("freeze_graph"),
    )
    edge = ExportEdgeModelsOperator(
        task_id="export_edge_models",
        frozen_model_uri=freeze.output["frozen_model_uri"],
        frozen_model_sha256=freeze.output["frozen_model_sha256"],
        frozen_model_json_uri=freeze.output["frozen_model_json_uri"],
        frozen_model_json_sha256=freeze.output["frozen_model_json_sha256"],
        dataset_prefix=dataset["dataset_prefix"],
        output_prefix="{{ ti.xcom_pull(task_ids='download_artifact', key='candidate_prefix') }}edge/",
        formats=plan["edge_formats"],
        aws_conn_id=AWS_CONN_ID,
        expected_bucket_owner=plan["expected_bucket_owner"],
        kms_key_id=plan["kms_key_id"],
        doc_md="Converts the frozen graph to ONNX (float32, and static int8 QDQ), LiteRT (float32 and "
        "full-integer int8) and OpenVINO IR (FP32, FP16, a bf16 runtime hint, and NNCF int8) in the run's "
        "`candidate/edge/` prefix; the int8 formats are calibrated on training images. A format that does not "
        "convert is listed with its reason; `validate_model` then judges the "
        "others in their own runtimes.",
        **scheduling.task_args("export_edge_models"),
    )
    report = validate_model(plan, dataset, artifact, freeze.output, edge.output)
    version = upload_frozen_model(plan, freeze.output, report, edge.output)
    approve = ReleaseApprovalOperator(
        task_id="approve_release",
        plan=plan, training=train.output, dataset=dataset, report=report, version=version,
        aws_conn_id=AWS_CONN_ID,
        response_timeout=timedelta(seconds=load_profile().settings.approval_timeout_seconds),  # the plan's rules
        doc_md="Asks a person to approve the new model where the deployment requires it and `publish` would "
        "promote it (the UI's *Required Actions*, or the REST API); Reject or no answer in time skips `publish`.",
        **scheduling.task_args("approve_release"),
    )
    published = publish(plan, train.output, dataset, report, version)
    recorded = RecordReleaseOperator(task_id="record_release", aws_conn_id=AWS_CONN_ID, **scheduling.task_args("record_release"))
    # The claim is the setup of everything that trains, its record their teardown: it runs
    # however the run ends, and clearing any task between them runs the claim again.
    record = RecordDataVersionOperator(task_id="record_data_version", plan=plan, claimed=claim.output,
                                       aws_conn_id=AWS_CONN_ID, **scheduling.task_args("record_data_version"))
    chain(plan, claim, dataset, code, train, artifact, freeze, edge, report, version, approve, published, record,
          cleanup())
    approve >> recorded >> record
    record.as_teardown(setups=claim)


def _s3_hook():
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=AWS_CONN_ID)


def _links(plan: dict, uris: dict) -> dict:
    """Where the ops team opens those S3 objects from the UI (``object_links``); logged."""
    from headpose_operators.s3 import object_links

    links = object_links(AWS_CONN_ID, uris, plan["region"])
    for name, url in links.items():
        print(f"link {name}: {url}")
    return links


def _s3(plan: dict):
    """The run's S3 client: the connection's, pinned to the bucket owner plan_run resolved, writing
    with the deployment's KMS key."""
    from headpose_operators.s3 import s3_client

    return s3_client(AWS_CONN_ID, plan.get("expected_bucket_owner"), plan.get("kms_key_id"))


def _fail(message: str):
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


headpose_retraining()
