"""The champion: the published model, evaluated on the same images as the new one.

Here, in the registry, rather than in ``artifacts``: it reads the published pointer, and
the artifacts rooms must not depend on the registry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from headpose.planning.layout import file_sha256, split_s3_uri
from headpose.registry.pointer import PublishError, is_missing_key, read_pointer

Log = Callable[[str], None]


def validate_candidate(
    s3_client: Any, plan: Mapping[str, Any], frozen: Mapping[str, Any], work_dir: str | Path, log: Log,
) -> dict[str, Any]:
    """``validate_model``'s work: the new model and the published one on the same held-out shards.

    Returns the acceptance outcome (``report.json`` written in ``work_dir/report``);
    raises ``ModelRefused`` when the model breaks the graph contract or the gate refuses it,
    and when the published pointer itself is broken (a person must look).
    """
    from headpose.artifacts.acceptance import ModelRefused, outcome_lines, validate_frozen_model
    from headpose.datasets.staging import download_split
    from headpose.planning.layout import require_workspace_file

    pb_path = require_workspace_file(frozen["frozen_model_path"], frozen["frozen_model_sha256"])
    workspace = Path(work_dir)
    eval_shards = download_split(s3_client, plan["dataset_prefix"], "eval", workspace / "eval-data")
    inputs, outputs = frozen["input_node_names"], frozen["output_node_names"]
    try:
        champion = evaluate_champion(
            s3_client, plan["published_pointer_uri"], eval_shards, workspace / "champion", inputs[0], outputs[0],
        )
    except PublishError as error:  # e.g. latest.json is not JSON
        raise ModelRefused(str(error)) from None
    min_accuracy = plan["run_params"]["min_accuracy"]
    try:
        outcome = validate_frozen_model(
            pb_path, frozen["saved_model_dir"], eval_shards, workspace / "report",
            min_accuracy=min_accuracy, training_job_name=plan["training_job_name"],
            input_node_names=inputs, output_node_names=outputs, champion=champion,
        )
    except ValueError as error:  # the graph itself is wrong
        raise ModelRefused(f"the frozen model breaks the graph contract: {error}") from None
    for line in outcome_lines(outcome, min_accuracy):
        log(line)
    if outcome["problems"]:
        raise ModelRefused("the frozen model is not published: " + "; ".join(outcome["problems"]))
    return outcome


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
