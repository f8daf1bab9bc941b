"""The acceptance gate between freezing and publishing: evaluate, report, decide.

``report.json`` holds the evaluation of the frozen graph on the evaluation set (accuracy,
every class's recall, the confusion matrix, parity with the SavedModel), the gate's
verdict with its reasons, the evaluation set and dataset it was judged on, and the same
evaluation of the published model (the champion). A model is accepted when its top-1
accuracy reaches ``min_accuracy``, every class present in the set is recognised at
least ``min_class_recall`` of the time (a model that never predicts a class fails however
accurate it is overall), and the frozen graph computes what the SavedModel computes.
Where the champion was scored on the same images, the two are compared image by image
(``artifacts.comparison``: the difference with its interval and the promotion rule's
verdict); whether an accepted model replaces the champion is ``registry.promotion``'s call
on that verdict. The confusion matrices, the new model's beside the champion's, are drawn
into ``confusion_matrix.png``.
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
# What report.json keeps of an evaluation but XCom does not: one entry per image or cell.
BULKY = ("per_image_correct", "labels_sha256", "confusion_matrix")


class ModelRefused(RuntimeError):
    """The new model must not be published; the message says why. Retrying cannot help.

    ``evidence``: ``{"report": uri, "report_page": uri, "confusion_matrix": uri}`` of the refused model's
    report where one was written (not for a graph that cannot even be scored).
    """

    def __init__(self, message: str, evidence: dict[str, str] | None = None):
        super().__init__(message)
        self.evidence = dict(evidence or {})


def lowest_recall(per_class: Sequence[Mapping[str, Any]]) -> tuple[float | None, str | None]:
    """The lowest recall among the classes present, and that class's name."""
    present = [c for c in per_class if c.get("count")]
    if not present:
        return None, None
    worst = min(present, key=lambda c: c["accuracy"])
    return float(worst["accuracy"]), worst["name"]


def acceptance_problems(
    evaluation: Mapping[str, Any], min_accuracy: float, min_class_recall: float = 0.0,
    max_parity: float = MAX_PARITY_ABS_DIFF,
) -> list[str]:
    """Why a frozen model must not be published (empty when it may be)."""
    problems = []
    accuracy, parity = evaluation["accuracy"], evaluation["parity_max_abs_diff"]
    if not accuracy >= min_accuracy:  # also refuses NaN
        problems.append(f"accuracy {accuracy:.4f} on the evaluation set is below min_accuracy {min_accuracy:.4f}")
    failing = [c for c in evaluation["per_class"] if c.get("count") and not c["accuracy"] >= min_class_recall]
    if failing:
        listed = ", ".join(f"{c['name']} {c['accuracy']:.2f} ({c['correct']}/{c['count']})" for c in failing)
        problems.append(f"recall below min_class_recall {min_class_recall:.2f} for {listed}")
    if parity is None:
        problems.append("parity with the SavedModel was not measured")
    elif not parity <= max_parity:
        problems.append(f"the frozen graph differs from the SavedModel by up to {parity:.3g} (allowed {max_parity:g})")
    return problems


def validate_frozen_model(
    pb_path: str | Path,
    saved_model_dir: str | Path,
    eval_shards: Iterable[str | Path],
    out_dir: str | Path,
    *,
    min_accuracy: float,
    min_class_recall: float = 0.0,
    training_job_name: str,
    input_node_names: Sequence[str] = ("inputs",),
    output_node_names: Sequence[str] = ("softmax_tensor",),
    max_parity: float = MAX_PARITY_ABS_DIFF,
    champion: Mapping[str, Any] | None = None,
    evaluation_set: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    reverse_channels: bool = False,
    promotion_rule: str = "not_worse",
    promotion_margin: float = 0.0,
) -> dict[str, Any]:
    """Evaluate, write ``report.json`` (+ confusion PNG) in ``out_dir``; return the summary.

    ``champion`` is ``registry.champion.evaluate_champion``'s result on the same shards;
    with its per-image results the report holds the paired ``comparison`` under
    ``promotion_rule`` and ``promotion_margin``.

    ``problems`` in the result is empty when the model may be published. A graph that
    breaks the contract (missing nodes, wrong output shape, not a GraphDef) raises
    ``ValueError``.
    """
    import tensorflow as tf

    from headpose.artifacts.confusion_plot import write_confusion_png
    from headpose.artifacts.evaluate import evaluate_frozen_graph

    shards = [Path(p) for p in eval_shards]
    try:
        evaluation = evaluate_frozen_graph(
            pb_path, shards, saved_model_dir=saved_model_dir,
            input_node=input_node_names[0], output_node=output_node_names[0], reverse_channels=reverse_channels,
        )
    except tf.errors.OpError as error:  # e.g. an input of another shape than the images
        raise ValueError(f"the frozen graph does not run on the evaluation images: "
                         f"{type(error).__name__}: {error.message}") from error
    problems = acceptance_problems(evaluation, min_accuracy, min_class_recall, max_parity)
    worst, worst_class = lowest_recall(evaluation["per_class"])
    comparison = compare_with_champion(evaluation, champion, promotion_rule, promotion_margin)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    report = {
        "training_job_name": training_job_name,
        "evaluated_at": datetime.now(timezone.utc).isoformat(),
        "frozen_model_sha256": file_sha256(pb_path),
        "evaluation_set": dict(evaluation_set) if evaluation_set else None,
        "dataset": dict(dataset) if dataset else None,
        "eval_shards": [p.name for p in shards],
        "min_accuracy": min_accuracy,
        "min_class_recall": min_class_recall,
        "min_class_recall_measured": worst,
        "lowest_recall_class": worst_class,
        "max_parity_abs_diff": max_parity,
        "accepted": not problems,
        "problems": problems,
        **evaluation,
        "champion": dict(champion) if champion else None,
        "comparison": comparison,
    }
    report_path = folder / REPORT_FILE
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = write_confusion_png(folder / CONFUSION_PNG_FILE, evaluation["confusion_matrix"],
                                   *_matrix_titles(training_job_name, evaluation, champion))
    return {
        "accepted": not problems,
        "accuracy": evaluation["accuracy"],
        "images": evaluation["images"],
        "per_class_recall": {c["name"]: c["accuracy"] for c in evaluation["per_class"]},
        "min_class_recall_measured": worst,
        "parity_max_abs_diff": evaluation["parity_max_abs_diff"],
        "problems": problems,
        "report_path": str(report_path),
        "confusion_png_path": str(png_path),
        "champion": light(champion) if champion else None,
        "comparison": comparison,
        "evaluation_set": dict(evaluation_set) if evaluation_set else None,
    }


def light(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation without its per-image and per-cell results (those stay in report.json)."""
    return {key: value for key, value in evaluation.items() if key not in BULKY}


def compare_with_champion(
    evaluation: Mapping[str, Any], champion: Mapping[str, Any] | None, rule: str, margin: float,
) -> dict[str, Any] | None:
    """The paired comparison with a champion scored on the same images (None: there is none)."""
    from headpose.artifacts.comparison import paired_comparison

    champion = champion or {}
    if not champion.get("per_image_correct") or not champion.get("comparable", True):
        return None
    if champion.get("labels_sha256") != evaluation["labels_sha256"]:
        # The same shards in the same order give the same labels; anything else is a bug, not a model to judge.
        raise RuntimeError("the published model was scored on other images than the new one (their labels differ)")
    return paired_comparison(evaluation["per_image_correct"], champion["per_image_correct"], rule=rule, margin=margin)


def _matrix_titles(job: str, evaluation: Mapping[str, Any], champion: Mapping[str, Any] | None) -> tuple:
    title = f"new: {job}\naccuracy {evaluation['accuracy']:.4f} on {evaluation['images']} images"
    if not (champion or {}).get("confusion_matrix"):
        return title, None, ""
    return (title, champion["confusion_matrix"],
            f"published: {champion['training_job_name']}\naccuracy {champion['accuracy']:.4f}, same images")


def outcome_lines(outcome: Mapping[str, Any], min_accuracy: float, min_class_recall: float) -> list[str]:
    """What ``validate_model`` logs: the gate's figures and verdict, then the published model's."""
    evaluation_set = (outcome.get("evaluation_set") or {}).get("id", "the evaluation set")
    lines = [
        f"validate_model's gate: accuracy {outcome['accuracy']:.4f} on {outcome['images']} images of "
        f"{evaluation_set} (min_accuracy {min_accuracy}); lowest class recall "
        f"{_figure(outcome['min_class_recall_measured'])} (min_class_recall {min_class_recall}); parity "
        f"max abs diff {outcome['parity_max_abs_diff']}. (train's eval_accuracy is a quick check on a "
        "few batches; this is the figure that gates publishing.)",
        "acceptance: " + ("accepted" if outcome["accepted"] else "refused - " + "; ".join(outcome["problems"])),
    ]
    champion = outcome.get("champion") or {}
    if champion.get("present"):
        figure = f"accuracy {champion['accuracy']:.4f}" if "accuracy" in champion else champion["error"]
        lines.append(f"published model {champion['training_job_name']} on the same images: {figure}; "
                     f"{champion.get('comparison', '')}")
    if outcome.get("comparison"):
        from headpose.artifacts.comparison import describe

        lines.append("paired comparison: " + describe(outcome["comparison"]))
    return lines


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
