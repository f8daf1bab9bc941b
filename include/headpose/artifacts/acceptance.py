"""The acceptance gate between freezing and publishing: evaluate, report, decide.

``report.json`` holds the held-out evaluation of the frozen graph (accuracy, per-class
counts, confusion matrix, parity with the SavedModel), the verdict, and the same
evaluation of the published model (the champion) for comparison. When the verdict
refuses the model, the DAG's task fails with the reasons, so nothing of the run is
uploaded beside the published model. Whether an accepted model replaces the champion is
``registry.promotion.promotion_decision``'s call.
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


class ModelRefused(RuntimeError):
    """The new model must not be published; the message says why. Retrying cannot help."""


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


def outcome_lines(outcome: Mapping[str, Any], min_accuracy: float) -> list[str]:
    """What ``validate_model`` logs: the new model's figures, then the published one's."""
    lines = [
        f"held-out accuracy: {outcome['accuracy']:.4f} on {outcome['images']} images "
        f"(min_accuracy {min_accuracy}); parity max abs diff: {outcome['parity_max_abs_diff']}"
    ]
    champion = outcome.get("champion") or {}
    if champion.get("present"):
        figure = f"accuracy {champion['accuracy']:.4f}" if "accuracy" in champion else champion["error"]
        lines.append(f"published model {champion['training_job_name']} on the same shards: {figure}")
    return lines
