"""``FreezeGraphOperator``: ``model.tar.gz`` in the workspace -> ``frozen_model.pb`` + metadata.

A thin shell over ``headpose.artifacts.archive`` (safe extraction, finding the SavedModel) and
``headpose.artifacts.freeze`` (freezing). TensorFlow is imported in ``execute`` only, so the DAG
file that uses this operator stays light to parse.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import Context


class FreezeGraphOperator(BaseOperator):
    """Freeze the SavedModel inside a training job's ``model.tar.gz``.

    :param training_job_name: the run's job name (templated), recorded in the result.
    :param artifact_path: local path of ``model.tar.gz`` in the shared workspace (templated).
    :param artifact_sha256: its checksum from the task that downloaded it (templated);
        a mismatch or a missing file means the workspace is not shared by the workers.
    :param output_dir: folder for the extracted model and the frozen graph (templated);
        what a previous try left there is replaced.
    :param input_node_names: input placeholder names (templated; a list or ``"a,b"``),
        default ``("inputs",)``; the tutorial's ``Const_1`` renames the signature's input.
    :param output_node_names: output node names (templated; a list or ``"a,b"``), default
        ``("softmax_tensor",)``, the Softmax behind the signature's ``probabilities``.
    :param channel_order: ``"bgr"`` or ``"rgb"`` for ``frozen_model.json`` (templated);
        default None: what the SavedModel records, else ``"bgr"``. A value that
        contradicts the SavedModel's record refuses the model.
    :return: names, paths, sha256, sizes and the channel order for XCom - never the graph itself.
    """

    template_fields: Sequence[str] = (
        "training_job_name", "artifact_path", "artifact_sha256", "output_dir",
        "input_node_names", "output_node_names", "channel_order",
    )
    ui_color = "#e8daef"

    def __init__(
        self,
        *,
        training_job_name: str,
        artifact_path: str,
        output_dir: str,
        artifact_sha256: str | None = None,
        input_node_names: str | Sequence[str] = ("inputs",),
        output_node_names: str | Sequence[str] = ("softmax_tensor",),
        channel_order: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.training_job_name = training_job_name
        self.artifact_path = artifact_path
        self.artifact_sha256 = artifact_sha256
        self.output_dir = output_dir
        self.input_node_names = input_node_names
        self.output_node_names = output_node_names
        self.channel_order = channel_order

    def execute(self, context: Context) -> dict[str, Any]:
        from headpose.artifacts.archive import ArchiveError, find_saved_model, safe_extract
        from headpose.artifacts.freeze import FreezeError, freeze_saved_model, node_names
        from headpose.planning.layout import file_sha256, require_workspace_file

        artifact = require_workspace_file(self.artifact_path, self.artifact_sha256)
        output = Path(self.output_dir)
        extracted, frozen_dir = output / "model", output / "frozen"
        for stale in (extracted, frozen_dir):
            if stale.exists():
                shutil.rmtree(stale)
        inputs, outputs = node_names(self.input_node_names), node_names(self.output_node_names)
        # A template of an unset value renders to "None" or "": both mean "as recorded".
        channel_order = None if self.channel_order in (None, "", "None") else self.channel_order
        try:
            safe_extract(artifact, extracted)
            saved_model = find_saved_model(extracted)
            self.log.info("Freezing %s (inputs %s, outputs %s)", saved_model, inputs, outputs)
            result = freeze_saved_model(
                saved_model, frozen_dir, input_node_names=inputs, output_node_names=outputs,
                channel_order=channel_order,
            )
        except (ArchiveError, FreezeError) as error:
            # The artifact itself is wrong: a retry would refuse it again.
            raise AirflowFailException(f"model artifact of {self.training_job_name} refused: {error}") from None
        self.log.info(
            "Frozen graph %s: %d nodes (from %d), sha256 %s, parity %s, channel order %s",
            result.pb_path, result.node_count, result.node_count_before, result.sha256,
            result.parity_max_abs_diff, result.channel_order,
        )
        summary = result.summary()
        return {
            "training_job_name": self.training_job_name,
            "saved_model_dir": str(saved_model),
            "frozen_model_path": summary["pb_path"],
            "frozen_model_json_path": summary["json_path"],
            "frozen_model_json_sha256": file_sha256(result.json_path),
            "frozen_model_sha256": summary["sha256"],
            "size_bytes": summary["size_bytes"],
            "node_count": summary["node_count"],
            "input_node_names": list(inputs),
            "output_node_names": list(outputs),
            "parity_max_abs_diff": summary["parity_max_abs_diff"],
            "channel_order": summary["channel_order"],
        }
