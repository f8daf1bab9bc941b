"""The champion: the published model, scored on the same images as the new one.

Here, in the registry, rather than in ``artifacts``: it reads the published pointer, and
the artifacts rooms must not depend on the registry.

A comparison is fair only on the same images. With a pinned evaluation set both models
are scored on it, whatever each was trained on: the champion is re-scored every run, so
an older record's figures (or one validated on another set) never stand in for it.
Without one, the new model is scored on its own dataset's eval split, and the published
model only counts as comparable when its record names that same dataset (manifest
sha256); otherwise ``comparable`` is false and promotion refuses to decide by accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from headpose.planning.handoff import HandoffError, download_verified
from headpose.registry.pointer import is_missing_key, read_pointer
from headpose.registry.record import RecordError, record_channel_order, record_files

DEFAULT_INPUT, DEFAULT_OUTPUT = "inputs", "softmax_tensor"


def comparability(
    record: Mapping[str, Any], evaluation_set: Mapping[str, Any], dataset: Mapping[str, Any],
) -> tuple[bool, str]:
    """Whether the published model's score on ``evaluation_set`` compares fairly with the new one's."""
    if evaluation_set["pinned"]:
        return True, f"both scored on the pinned evaluation set {evaluation_set['id']}"
    theirs = record.get("dataset") or {}
    if theirs.get("manifest_sha256") and theirs["manifest_sha256"] == dataset.get("manifest_sha256"):
        return True, f"both scored on the eval split of {dataset.get('dataset_id')}, which both were validated on"
    return False, (
        f"the published model was validated on {theirs.get('dataset_id') or 'a dataset its record does not name'}, "
        f"this run on {dataset.get('dataset_id')}; without a pinned evaluation set their scores are not comparable"
    )


def evaluate_champion(
    s3_client: Any,
    pointer_uri: str,
    eval_shards: Iterable[str | Path],
    evaluation_set: Mapping[str, Any],
    dataset: Mapping[str, Any],
    work_dir: str | Path,
    fallback_uri: str | None = None,
) -> dict[str, Any]:
    """The published model's figures on the evaluation set, and whether they compare fairly.

    ``{"present": False}`` when nothing is published. A published model that cannot be
    evaluated (a file gone or changed, a graph that does not run) gives ``error`` instead
    of ``accuracy``; S3 being unreachable raises, so that the task retries. ``fallback_uri``
    is read when ``pointer_uri`` holds nothing (``latest.json`` before the channels exist).
    """
    import tensorflow as tf

    from headpose.artifacts.evaluate import evaluate_frozen_graph

    record, etag = read_pointer(s3_client, pointer_uri)
    if record is None and fallback_uri:
        record, etag = read_pointer(s3_client, fallback_uri)
    if record is None:
        return {"present": False}
    result: dict[str, Any] = {
        "present": True, "training_job_name": record["training_job_name"], "pointer_etag": etag,
        "published_at": record.get("published_at"),
    }
    comparable, why = comparability(record, evaluation_set, dataset)
    result.update(comparable=comparable, comparison=why)
    try:
        files = record_files(record)
        frozen = files["frozen_model.pb"]
        result.update(frozen_model_uri=frozen["uri"], frozen_model_sha256=frozen["sha256"])
        pb_path, inputs, outputs = _fetch(s3_client, files, Path(work_dir))
        channel_order = record_channel_order(record)
    except (RecordError, HandoffError, ValueError) as error:
        return {**result, "error": f"cannot fetch the published model: {error}"}
    except Exception as error:
        if not is_missing_key(error):
            raise
        return {**result, "error": f"cannot fetch the published model: {error}"}
    try:
        evaluation = evaluate_frozen_graph(
            pb_path, eval_shards, input_node=inputs, output_node=outputs,
            reverse_channels=channel_order != evaluation_set["channel_order"],
        )
    except (ValueError, tf.errors.OpError) as error:
        return {**result, "error": f"the published frozen graph does not run: {type(error).__name__}: {error}"}
    return {
        **result, "accuracy": evaluation["accuracy"], "images": evaluation["images"], "channel_order": channel_order,
        "per_class_recall": {c["name"]: c["accuracy"] for c in evaluation["per_class"]},
        # For the paired comparison and the matrix beside the new one's; report.json keeps them, XCom does not.
        **{key: evaluation[key] for key in ("per_image_correct", "labels_sha256", "confusion_matrix")},
    }


def _fetch(s3_client: Any, files: Mapping[str, Any], folder: Path) -> tuple[Path, str, str]:
    """The champion's frozen graph (verified) and its node names (from its metadata, if it has one)."""
    pb = files["frozen_model.pb"]
    pb_path = download_verified(s3_client, pb["uri"], folder / "champion_frozen_model.pb", pb["sha256"])
    inputs, outputs = DEFAULT_INPUT, DEFAULT_OUTPUT
    meta = files.get("frozen_model.json")
    if meta and meta.get("sha256"):  # version 2 records know no metadata checksum: defaults then
        meta_path = download_verified(s3_client, meta["uri"], folder / "champion_frozen_model.json", meta["sha256"])
        metadata = json.loads(meta_path.read_text())
        inputs, outputs = metadata["inputs"][0]["name"], metadata["outputs"][0]["name"]
    return pb_path, inputs, outputs
