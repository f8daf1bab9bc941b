"""``FreezeGraphOperator``: ``model.tar.gz`` in S3 -> ``frozen_model.pb`` + metadata in S3.

A thin shell over ``headpose.artifacts.archive`` (safe extraction, finding the SavedModel)
and ``headpose.artifacts.freeze`` (freezing). The artifact is downloaded from S3 and
checked against the sha256 ``download_artifact`` recorded; the results are uploaded to the
run's candidate prefix before the task succeeds, so the task can run on any worker and be
cleared alone. TensorFlow is imported in ``execute`` only, so the DAG file stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context


class FreezeGraphOperator(BaseOperator):
    """Freeze the SavedModel inside a training job's ``model.tar.gz``.

    :param training_job_name: the training job whose artifact this is (templated).
    :param artifact_uri: ``s3://`` URI of its ``model.tar.gz`` (templated).
    :param artifact_sha256: its checksum as ``download_artifact`` recorded it (templated);
        an object with another sha256 is refused.
    :param output_prefix: ``s3://`` prefix the frozen graph and its metadata go to (templated).
    :param input_node_names: input placeholder names (templated; a list or ``"a,b"``),
        default ``("inputs",)``; the tutorial's ``Const_1`` renames the signature's input.
    :param output_node_names: output node names (templated; a list or ``"a,b"``), default
        ``("softmax_tensor",)``, the Softmax behind the signature's ``probabilities``.
    :param channel_order: ``"bgr"`` or ``"rgb"`` for ``frozen_model.json`` (templated);
        default None: what the SavedModel records, else ``"bgr"``. A value that
        contradicts the SavedModel's record refuses the model.
    :param aws_conn_id: the AWS connection of the S3 calls.
    :param expected_bucket_owner: the account that must own the bucket (templated); None: any.
    :param kms_key_id: the KMS key every object it writes is encrypted with (SSE-KMS; templated); None: the
        bucket's default encryption.
    :return: names, URIs, sha256s, sizes and the channel order for XCom - never the graph itself.
    """

    template_fields: Sequence[str] = (
        "training_job_name", "artifact_uri", "artifact_sha256", "output_prefix",
        "input_node_names", "output_node_names", "channel_order", "expected_bucket_owner", "kms_key_id",
    )
    ui_color = "#e8daef"

    def __init__(
        self,
        *,
        training_job_name: str,
        artifact_uri: str,
        artifact_sha256: str,
        output_prefix: str,
        input_node_names: str | Sequence[str] = ("inputs",),
        output_node_names: str | Sequence[str] = ("softmax_tensor",),
        channel_order: str | None = None,
        aws_conn_id: str = "aws_default",
        expected_bucket_owner: str | None = None,
        kms_key_id: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.training_job_name = training_job_name
        self.artifact_uri = artifact_uri
        self.artifact_sha256 = artifact_sha256
        self.output_prefix = output_prefix
        self.input_node_names = input_node_names
        self.output_node_names = output_node_names
        self.channel_order = channel_order
        self.aws_conn_id = aws_conn_id
        self.expected_bucket_owner = expected_bucket_owner
        self.kms_key_id = kms_key_id

    def execute(self, context: Context) -> dict[str, Any]:
        from headpose.artifacts.quiet_tensorflow import import_tensorflow

        import_tensorflow(self.log.info)
        from headpose.artifacts.archive import ArchiveError, find_saved_model, safe_extract
        from headpose.artifacts.freeze import FreezeError, freeze_saved_model, node_names
        from headpose.planning.handoff import HandoffError, download_verified, upload_file
        from headpose.planning.layout import FROZEN_MODEL_FILE, FROZEN_MODEL_JSON_FILE, task_scratch
        from headpose_operators.s3 import s3_client

        s3 = s3_client(self.aws_conn_id, self.expected_bucket_owner or None, self.kms_key_id or None)
        inputs, outputs = node_names(self.input_node_names), node_names(self.output_node_names)
        # A template of an unset value renders to "None" or "": both mean "as recorded".
        channel_order = None if self.channel_order in (None, "", "None") else self.channel_order
        with task_scratch(self.training_job_name, self.task_id) as scratch:
            try:
                archive = download_verified(s3, self.artifact_uri, scratch / "model.tar.gz", self.artifact_sha256)
                saved_model = find_saved_model(safe_extract(archive, scratch / "model"))
                self.log.info("Freezing %s (inputs %s, outputs %s)", saved_model, inputs, outputs)
                result = freeze_saved_model(saved_model, scratch / "frozen", input_node_names=inputs,
                                            output_node_names=outputs, channel_order=channel_order)
            except (ArchiveError, FreezeError, HandoffError) as error:
                # The artifact itself is wrong: a retry would refuse it again.
                raise AirflowFailException(f"model artifact of {self.training_job_name} refused: {error}") from None
            prefix = self.output_prefix.rstrip("/") + "/"
            pb_uri, json_uri = prefix + FROZEN_MODEL_FILE, prefix + FROZEN_MODEL_JSON_FILE
            pb_sha256 = upload_file(s3, result.pb_path, pb_uri)
            json_sha256 = upload_file(s3, result.json_path, json_uri)
        self.log.info(
            "Frozen graph %s: %d nodes (from %d), sha256 %s, parity %s, channel order %s",
            pb_uri, result.node_count, result.node_count_before, pb_sha256, result.parity_max_abs_diff,
            result.channel_order,
        )
        return {
            "training_job_name": self.training_job_name,
            "frozen_model_uri": pb_uri,
            "frozen_model_sha256": pb_sha256,
            "frozen_model_json_uri": json_uri,
            "frozen_model_json_sha256": json_sha256,
            "size_bytes": result.size_bytes,
            "node_count": result.node_count,
            "input_node_names": list(result.input_names),
            "output_node_names": list(result.output_names),
            "channel_order": result.channel_order,
            "parity_max_abs_diff": result.parity_max_abs_diff,
        }
