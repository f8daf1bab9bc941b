"""``ExportEdgeModelsOperator``: the frozen graph in S3 -> its edge formats in S3.

A thin shell over ``headpose.artifacts.edge.transfer.export_from_s3`` (download and
verify the inputs, convert to ONNX, LiteRT and OpenVINO IR, float and int8, upload). The converters and
TensorFlow are imported in ``execute`` only, so a DAG file using this operator stays
light to parse. Nothing is shared with other tasks through the disk: inputs come from
S3 by URI and sha256, outputs go to ``output_prefix``, scratch is removed at the end.
"""
from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

# Light: the format names only; the converters import their libraries when they run.
from headpose.artifacts.edge.export import DEFAULT_FORMATS

if TYPE_CHECKING:
    from airflow.sdk import Context


class ExportEdgeModelsOperator(BaseOperator):
    """Convert a frozen graph into the edge formats and upload them beside it.

    A format that cannot be produced is listed in ``refused`` with its reason and the
    task still succeeds; it fails (without retrying) only when the inputs are refused or
    no format at all could be exported.

    :param frozen_model_uri: ``s3://`` URI of ``frozen_model.pb`` (templated).
    :param frozen_model_sha256: its sha256 from the task that wrote it (templated).
    :param frozen_model_json_uri: ``s3://`` URI of ``frozen_model.json`` (templated).
    :param frozen_model_json_sha256: its sha256, checked when given (templated).
    :param dataset_prefix: ``s3://`` dataset prefix; a few ``train-*.tfrecord`` shards
        calibrate the int8 formats (templated).
    :param output_prefix: ``s3://`` prefix the formats and ``edge_models.json`` are
        uploaded under (templated).
    :param formats: format names, a list or ``"a,b"`` (templated); default every format.
    :param max_representative_shards: most training shards downloaded (default 2).
    :param max_representative_images: most images in the representative set (default 200).
    :param aws_conn_id: the Airflow AWS connection of the S3 store.
    :param expected_bucket_owner: the account that must own the bucket (templated); None: any.
    :param kms_key_id: the KMS key every object it writes is encrypted with (SSE-KMS; templated); None: the
        bucket's default encryption.
    :return: ``{"formats": {name: {"files": {file: {"uri", "sha256"}}, "runtime",
        "precision", "metadata"}}, "refused": {name: reason}, "edge_models_json_uri",
        "edge_models_json_sha256"}`` - names, URIs and checksums, never files.
    """

    template_fields: Sequence[str] = (
        "frozen_model_uri", "frozen_model_sha256", "frozen_model_json_uri", "frozen_model_json_sha256",
        "dataset_prefix", "output_prefix", "formats", "expected_bucket_owner", "kms_key_id",
    )
    ui_color = "#d5f5e3"

    def __init__(
        self,
        *,
        frozen_model_uri: str,
        frozen_model_sha256: str,
        frozen_model_json_uri: str,
        dataset_prefix: str,
        output_prefix: str,
        frozen_model_json_sha256: str | None = None,
        formats: str | Sequence[str] = DEFAULT_FORMATS,
        max_representative_shards: int = 2,
        max_representative_images: int = 200,
        aws_conn_id: str | None = "aws_default",
        expected_bucket_owner: str | None = None,
        kms_key_id: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.frozen_model_uri = frozen_model_uri
        self.frozen_model_sha256 = frozen_model_sha256
        self.frozen_model_json_uri = frozen_model_json_uri
        self.frozen_model_json_sha256 = frozen_model_json_sha256
        self.dataset_prefix = dataset_prefix
        self.output_prefix = output_prefix
        self.formats = formats
        self.max_representative_shards = max_representative_shards
        self.max_representative_images = max_representative_images
        self.aws_conn_id = aws_conn_id
        self.expected_bucket_owner = expected_bucket_owner
        self.kms_key_id = kms_key_id

    def execute(self, context: Context) -> dict[str, Any]:
        from headpose.artifacts.quiet_tensorflow import import_tensorflow

        import_tensorflow(self.log.info)
        from headpose.artifacts.edge.transfer import EdgeExportRefused, export_from_s3
        from headpose_operators.s3 import s3_client as pinned_client

        s3_client = pinned_client(self.aws_conn_id, self.expected_bucket_owner or None, self.kms_key_id or None)
        with tempfile.TemporaryDirectory(prefix="export-edge-") as scratch:
            try:
                result = export_from_s3(
                    s3_client, scratch,
                    frozen_model_uri=self.frozen_model_uri, frozen_model_sha256=self.frozen_model_sha256,
                    frozen_model_json_uri=self.frozen_model_json_uri,
                    frozen_model_json_sha256=self.frozen_model_json_sha256 or None,
                    dataset_prefix=self.dataset_prefix, output_prefix=self.output_prefix,
                    formats=self.formats, max_shards=self.max_representative_shards,
                    max_images=self.max_representative_images, log=self.log.info,
                )
            except EdgeExportRefused as error:
                # Refused inputs or a graph no converter takes: a retry would refuse them again.
                raise AirflowFailException(f"edge export refused: {error}") from None
        self.log.info("Edge formats exported: %s; refused: %s", sorted(result["formats"]),
                      sorted(result["refused"]) or "none")
        return result
