"""``validate_model``: the new model and the published one, judged on the same images.

Reads everything from S3 by URI and sha256 (the frozen graph, the training job's
``model.tar.gz`` for the SavedModel parity check, the evaluation set, the published
model), so it runs on any worker after any failure. The report and confusion matrix go
to S3 before the task ends: beside the candidate when the model is accepted, under the
run's ``rejected/`` prefix when it is not - the evidence of a refusal is never lost, and
never lands under ``published/``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from headpose.planning.layout import CONFUSION_PNG_FILE, REPORT_FILE, REPORT_HTML_FILE, RunLayout

Log = Callable[[str], None]


def validate_candidate(
    s3_client: Any,
    plan: Mapping[str, Any],
    dataset: Mapping[str, Any],
    artifact: Mapping[str, Any],
    frozen: Mapping[str, Any],
    scratch: str | Path,
    log: Log,
    edge: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Judge the run's frozen model and its edge formats; the outcome (URIs, figures, champion) for XCom.

    ``edge`` is ``export_edge_models``' XCom: each format runs in its own runtime on the
    same images; one that misses its tolerance is withheld, the others are not.

    Raises ``ModelRefused`` when the model breaks the graph contract or the gate refuses
    it (after uploading the evidence), and when the published pointer itself is broken.
    """
    from headpose.artifacts.quiet_tensorflow import import_tensorflow

    import_tensorflow(log)
    from headpose.artifacts.acceptance import ModelRefused, outcome_lines, validate_frozen_model
    from headpose.artifacts.archive import find_saved_model, safe_extract
    from headpose.artifacts.report_html import write_report_html
    from headpose.datasets.evaluation_set import fetch_evaluation_set
    from headpose.planning.handoff import download_verified, upload_file
    from headpose.registry.champion import evaluate_champion
    from headpose.registry.pointer import PublishError

    work = Path(scratch)
    layout = RunLayout.from_dict(plan).for_job(frozen["training_job_name"])
    params = plan["run_params"]
    pb_path = download_verified(
        s3_client, frozen["frozen_model_uri"], work / "frozen_model.pb", frozen["frozen_model_sha256"])
    archive = download_verified(s3_client, artifact["artifact_uri"], work / "model.tar.gz", artifact["sha256"])
    saved_model = find_saved_model(safe_extract(archive, work / "model"))
    evaluation_set, shards = fetch_evaluation_set(
        s3_client, plan["deployment"]["evaluation_set"], dataset, work / "eval")
    source = "pinned by the deployment" if evaluation_set.pinned else "this run's eval split"
    log(f"evaluation set: {evaluation_set.id} ({source}), {len(shards)} shards, {evaluation_set.channel_order.upper()}")
    try:
        champion = evaluate_champion(s3_client, plan.get("champion_pointer_uri") or plan["published_pointer_uri"],
                                     shards, evaluation_set.to_dict(), dataset, work / "champion",
                                     fallback_uri=plan["published_pointer_uri"])
    except PublishError as error:  # e.g. latest.json is not JSON: a person must look
        raise ModelRefused(str(error)) from None
    try:
        outcome = validate_frozen_model(
            pb_path, saved_model, shards, work / "report",
            min_accuracy=params["min_accuracy"], min_class_recall=params["min_class_recall"],
            training_job_name=layout.training_job_name,
            input_node_names=frozen["input_node_names"], output_node_names=frozen["output_node_names"],
            champion=champion, evaluation_set=evaluation_set.to_dict(), dataset=_dataset_section(dataset),
            reverse_channels=frozen["channel_order"] != evaluation_set.channel_order,
            promotion_rule=params["promotion_rule"], promotion_margin=params["promotion_margin"],
        )
    except ValueError as error:  # the graph itself is wrong
        raise ModelRefused(f"the frozen model breaks the graph contract: {error}") from None
    for line in outcome_lines(outcome, params["min_accuracy"], params["min_class_recall"]):
        log(line)
    report_path = Path(outcome["report_path"])
    if edge and outcome["accepted"]:
        outcome["formats"] = _edge_verdicts(s3_client, edge, pb_path, shards, work / "edge", log)
        report_path.write_text(json.dumps({**json.loads(report_path.read_text()), "formats": outcome["formats"]},
                                          indent=2) + "\n")
    html_path = write_report_html(json.loads(report_path.read_text()), outcome["confusion_png_path"],
                                  report_path.with_name(REPORT_HTML_FILE))
    where = layout.candidate_prefix if outcome["accepted"] else layout.rejected_prefix
    uploaded = {
        "report_uri": where + REPORT_FILE,
        "report_sha256": upload_file(s3_client, outcome.pop("report_path"), where + REPORT_FILE),
        "report_html_uri": where + REPORT_HTML_FILE,
        "report_html_sha256": upload_file(s3_client, html_path, where + REPORT_HTML_FILE),
        "confusion_png_uri": where + CONFUSION_PNG_FILE,
        "confusion_png_sha256": upload_file(s3_client, outcome.pop("confusion_png_path"), where + CONFUSION_PNG_FILE),
    }
    if not outcome["accepted"]:
        # Where the evidence is comes first: the failure line keeps the start of a long message.
        raise ModelRefused(
            f"the frozen model is not published. Report: {uploaded['report_uri']}, confusion matrix: "
            f"{uploaded['confusion_png_uri']}. Why: " + "; ".join(outcome["problems"]),
            evidence={"report": uploaded["report_uri"], "report_page": uploaded["report_html_uri"],
                      "confusion_matrix": uploaded["confusion_png_uri"]},
        )
    return {**outcome, **uploaded, "training_job_name": layout.training_job_name}


def _dataset_section(dataset: Mapping[str, Any]) -> dict[str, Any]:
    return {key: dataset.get(key) for key in (
        "dataset_prefix", "dataset_id", "manifest_uri", "manifest_sha256", "source", "channel_order",
        "train_count", "eval_count", "validation",
    )}


def _edge_verdicts(
    s3_client: Any, edge: Mapping[str, Any], pb_path: Path, shards: list[Path], folder: Path, log: Log,
) -> dict[str, dict[str, Any]]:
    """Every exported format judged in its runtime; without the files' local paths (XCom)."""
    from headpose.artifacts.edge.converter import EdgeFormatError
    from headpose.artifacts.edge.transfer import download_edge_models
    from headpose.artifacts.edge.validate import validate_edge_models, validation_table
    from headpose.planning.handoff import HandoffError

    try:
        manifest = download_edge_models(s3_client, edge["edge_models_json_uri"], folder,
                                        edge.get("edge_models_json_sha256"))
        verdicts = validate_edge_models(manifest, folder, pb_path, shards)
    except (EdgeFormatError, HandoffError) as error:
        # The formats cannot be judged: none is published; the frozen graph still may be.
        log(f"edge formats withheld: {error}")
        return {name: {"accepted": False, "reason": str(error)} for name in edge.get("formats") or {}}
    log("edge formats on the same images:\n" + validation_table(verdicts))
    return {name: {k: v for k, v in verdict.items() if k != "files"} for name, verdict in verdicts.items()}
