"""The acceptance gate between freezing and publishing: evaluate, report, decide.

``report.json`` holds the held-out evaluation of the frozen graph (accuracy, per-class
counts, confusion matrix, parity with the SavedModel), the verdict, and the same
evaluation of the published model (the champion) for comparison. When the verdict
refuses the model, the DAG's task fails with the reasons, so nothing of the run is
uploaded beside the published model. Whether an accepted model replaces the champion is
``publish.promotion_decision``'s call.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from headpose.planning.layout import CONFUSION_PNG_FILE, REPORT_FILE, file_sha256

# The frozen graph must compute what the SavedModel computes; float32 reordering by
# Grappler's folding stays orders of magnitude below this.
MAX_PARITY_ABS_DIFF = 1e-4


def acceptance_problems(
    accuracy: float, parity_max_abs_diff: float | None, min_accuracy: float,
    max_parity: float = MAX_PARITY_ABS_DIFF,
) -> list[str]:
    """Why a frozen model must not be published (empty when it may be)."""
    problems = []
    if not accuracy >= min_accuracy:  # also refuses NaN
        problems.append(f"held-out accuracy {accuracy:.4f} is below min_accuracy {min_accuracy:.4f}")
    if parity_max_abs_diff is None:
        problems.append("parity with the SavedModel was not measured")
    elif not parity_max_abs_diff <= max_parity:
        problems.append(
            f"the frozen graph differs from the SavedModel by up to {parity_max_abs_diff:.3g} "
            f"(allowed {max_parity:g})"
        )
    return problems


def validate_frozen_model(
    pb_path: str | Path,
    saved_model_dir: str | Path,
    eval_shards: Iterable[str | Path],
    out_dir: str | Path,
    *,
    min_accuracy: float,
    training_job_name: str,
    input_node_names: Sequence[str] = ("inputs",),
    output_node_names: Sequence[str] = ("softmax_tensor",),
    max_parity: float = MAX_PARITY_ABS_DIFF,
    champion: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate, write ``report.json`` (+ confusion PNG) in ``out_dir``; return the XCom summary.

    ``problems`` in the result is empty when the model may be published. ``champion``
    (``evaluate_champion``'s result) is recorded in the report and the summary. A graph
    that breaks the contract (missing nodes, wrong output shape, not a GraphDef) raises
    ``ValueError``.
    """
    from headpose.artifacts.evaluate import evaluate_frozen_graph, write_confusion_png

    import tensorflow as tf

    shards = [Path(p) for p in eval_shards]
    try:
        evaluation = evaluate_frozen_graph(
            pb_path, shards, saved_model_dir=saved_model_dir,
            input_node=input_node_names[0], output_node=output_node_names[0],
        )
    except tf.errors.OpError as error:  # e.g. an input of another shape than the images
        raise ValueError(f"the frozen graph does not run on the held-out images: "
                         f"{type(error).__name__}: {error.message}") from error
    problems = acceptance_problems(
        evaluation["accuracy"], evaluation["parity_max_abs_diff"], min_accuracy, max_parity
    )
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    report = {
        "training_job_name": training_job_name,
        "evaluated_at": datetime.now(timezone.utc).isoformat(),
        "frozen_model_sha256": file_sha256(pb_path),
        "eval_shards": [p.name for p in shards],
        "min_accuracy": min_accuracy,
        "max_parity_abs_diff": max_parity,
        "accepted": not problems,
        "problems": problems,
        **evaluation,
        "champion": dict(champion) if champion else None,
    }
    report_path = folder / REPORT_FILE
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = write_confusion_png(evaluation["confusion_matrix"], folder / CONFUSION_PNG_FILE)
    return {
        "accuracy": evaluation["accuracy"],
        "images": evaluation["images"],
        "parity_max_abs_diff": evaluation["parity_max_abs_diff"],
        "problems": problems,
        "report_path": str(report_path),
        "report_sha256": file_sha256(report_path),
        "confusion_png_path": str(png_path),
        "champion": dict(champion) if champion else None,
    }


def evaluate_champion(
    s3_client: Any,
    pointer_uri: str,
    eval_shards: Iterable[str | Path],
    work_dir: str | Path,
    input_node: str = "inputs",
    output_node: str = "softmax_tensor",
) -> dict[str, Any]:
    """The published model's accuracy on the same held-out shards as the new one.

    ``{"present": False}`` when nothing is published. A published model that cannot be
    evaluated (its file is gone or changed, or the graph does not run) gives ``error``
    instead of ``accuracy``; S3 being unreachable raises, so that the task retries.
    """
    import tensorflow as tf

    from headpose.artifacts.evaluate import evaluate_frozen_graph
    from headpose.planning.layout import split_s3_uri
    from headpose.registry.promotion import is_missing_key, read_pointer

    record, etag = read_pointer(s3_client, pointer_uri)
    if record is None:
        return {"present": False}
    result: dict[str, Any] = {
        "present": True,
        "training_job_name": record["training_job_name"],
        "frozen_model_uri": record.get("frozen_model_uri"),
        "frozen_model_sha256": record.get("frozen_model_sha256"),
        "pointer_etag": etag,
        "published_at": record.get("published_at"),
    }
    folder = Path(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    pb_path = folder / "champion_frozen_model.pb"
    try:
        bucket, key = split_s3_uri(record.get("frozen_model_uri") or "")
        s3_client.download_file(bucket, key, str(pb_path))
    except Exception as error:
        if not (is_missing_key(error) or isinstance(error, ValueError)):
            raise
        return {**result, "error": f"cannot fetch the published frozen graph: {error}"}
    actual = file_sha256(pb_path)
    if actual != record.get("frozen_model_sha256"):
        return {**result, "error": f"{record['frozen_model_uri']} has sha256 {actual}, "
                f"latest.json records {record.get('frozen_model_sha256')}"}
    try:
        evaluation = evaluate_frozen_graph(pb_path, eval_shards, input_node=input_node, output_node=output_node)
    except (ValueError, tf.errors.OpError) as error:
        return {**result, "error": f"the published frozen graph does not run: {type(error).__name__}: {error}"}
    return {**result, "accuracy": evaluation["accuracy"], "images": evaluation["images"]}
