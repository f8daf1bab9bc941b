"""Each exported format run in its own runtime on the evaluation set, against the frozen graph.

The formats run through the edge client's own adapters (``headpose.edge.runtimes``), so
what is judged here is what a device runs. Every batch of held-out images goes through
the frozen graph (TensorFlow, the reference) and through every format; a format's files
are checked against the sha256 that ``edge_models.json`` records before they are loaded.

Tolerances (DESIGN.md, Publishing):

* float32 formats: every probability within ``FLOAT32_MAX_ABS_DIFF`` of TensorFlow's;
* reduced precision (float16 weights, the bfloat16 hint, int8): judged by accuracy, at
  most ``REDUCED_MAX_ACCURACY_DROP`` (one accuracy point) below the frozen graph's, or
  ``TINY_SET_MAX_DROP_IMAGES`` images where one point is fewer images than that (CI's
  set has 93, where one point would be less than one image).

A format that misses is withheld with the reason; the others are judged on their own.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from headpose.artifacts.edge.converter import EdgeFormatError, file_digest
from headpose.edge.errors import EdgeClientError

FLOAT32_MAX_ABS_DIFF = 1e-4
REDUCED_MAX_ACCURACY_DROP = 0.01
TINY_SET_MAX_DROP_IMAGES = 2
DEFAULT_BATCH_SIZE = 32
DEFAULT_LATENCY_CALLS = 20
_WARM_UP_CALLS = 3


def validate_edge_models(
    edge_models: Mapping[str, Any],
    model_dir: str | Path,
    frozen_pb: str | Path,
    eval_shards: Iterable[str | Path],
    batch_size: int = DEFAULT_BATCH_SIZE,
    latency_calls: int = DEFAULT_LATENCY_CALLS,
    threads: int | None = None,
) -> dict[str, dict[str, Any]]:
    """``{format: verdict}`` for every format of ``edge_models`` (``edge_models.json``'s content).

    A verdict is ``{"runtime", "precision", "accuracy", "max_abs_diff", "latency_ms_b1",
    "accepted", "reason", "files": {name: {"path", "sha256"}}}`` plus ``images``,
    ``correct`` and the frozen graph's ``reference_accuracy``. Formats refused at export
    are listed as withheld with their export reason. ``latency_ms_b1`` is the median of
    ``latency_calls`` single-image calls on this machine, ``threads`` the runtimes' thread
    count (``None``: the edge client's defaults, ``runtimes.DEFAULT_THREADS``). Raises ``EdgeFormatError`` when ``frozen_pb``
    is not the graph the formats were converted from.
    """
    from headpose.artifacts.evaluate import load_frozen_graph

    frozen = edge_models.get("frozen_model") or {}
    sha256, _ = file_digest(frozen_pb)
    if sha256 != frozen.get("sha256"):
        raise EdgeFormatError(f"{frozen_pb} has sha256 {sha256}; the formats were converted from {frozen.get('sha256')}")
    graph = load_frozen_graph(frozen_pb, frozen["input"], frozen["output"])
    verdicts = {name: _withheld(None, None, {}, reason) for name, reason in (edge_models.get("refused") or {}).items()}
    runners = _open_formats(edge_models.get("formats") or {}, Path(model_dir), threads, verdicts)
    scores = {name: {"correct": 0, "max_abs_diff": 0.0} for name in runners}
    reference = _run_evaluation_set(graph, runners, scores, verdicts, eval_shards, batch_size)
    for name, runner in runners.items():
        score = scores[name]
        accepted, reason = verdict(verdicts[name]["precision"], reference["images"], score["correct"],
                                   reference["correct"], score["max_abs_diff"])
        verdicts[name].update(
            accuracy=score["correct"] / reference["images"], max_abs_diff=score["max_abs_diff"],
            latency_ms_b1=latency_ms(runner, reference["first_image"], latency_calls),
            accepted=accepted, reason=None if accepted else f"{name}: {reason}", correct=score["correct"],
        )
        if hasattr(runner, "precision"):  # OpenVINO: what the hint became on this CPU
            verdicts[name]["runtime_precision"] = runner.precision()
    for entry in verdicts.values():
        entry.update(images=reference["images"], reference_accuracy=reference["correct"] / reference["images"],
                     reference_correct=reference["correct"])
    return verdicts


def _open_formats(formats: Mapping[str, Any], folder: Path, threads: int | None,
                  verdicts: dict[str, dict]) -> dict[str, Any]:
    """A runner per format whose files check out and whose runtime loads them; the others withheld."""
    runners = {}
    for name, entry in formats.items():
        files = {file: {"path": str(folder / file), "sha256": ref["sha256"]} for file, ref in entry["files"].items()}
        verdicts[name] = {"runtime": entry["runtime"], "precision": entry["precision"], "files": files}
        try:
            _check_files(files)
            runners[name] = _open(entry["metadata"], folder, threads)
        except Exception as error:  # a runtime refusing the file is a verdict, not a crash
            verdicts[name] = _withheld(entry["runtime"], entry["precision"], files, f"{name}: {_text(error)}")
    return runners


def _run_evaluation_set(graph, runners: dict, scores: dict, verdicts: dict, eval_shards, batch_size: int) -> dict:
    """Every batch through the frozen graph and each runner; the frozen graph's counts.

    A runner whose output is unusable is withheld and dropped from ``runners``.
    """
    from headpose.training import shards

    images_seen, correct, first_image = 0, 0, None
    for images, labels in shards.dataset(list(eval_shards), batch_size, training=False):
        images, labels = images.numpy(), labels.numpy()
        first_image = images[:1] if first_image is None else first_image
        reference = graph(images)
        correct += int((reference.argmax(axis=1) == labels).sum())
        images_seen += len(labels)
        for name in list(runners):
            problem = _score(runners[name], images, labels, reference, scores[name])
            if problem:
                entry = verdicts[name]
                verdicts[name] = _withheld(entry["runtime"], entry["precision"], entry["files"], f"{name}: {problem}")
                del runners[name]
    if images_seen == 0:
        raise EdgeFormatError("the evaluation shards hold no images")
    return {"images": images_seen, "correct": correct, "first_image": first_image}


def verdict(precision: str, images: int, correct: int, reference_correct: int,
            max_abs_diff: float) -> tuple[bool, str]:
    """Whether a format holds its tolerance, and if not, why (DESIGN.md's rules)."""
    if precision == "float32":
        if max_abs_diff <= FLOAT32_MAX_ABS_DIFF:  # False for NaN too
            return True, ""
        return False, (f"probabilities differ from the frozen graph's by up to {max_abs_diff:.3g}; "
                       f"float32 formats may differ by {FLOAT32_MAX_ABS_DIFF:g}")
    allowed = max(REDUCED_MAX_ACCURACY_DROP * images, TINY_SET_MAX_DROP_IMAGES)
    lost = reference_correct - correct
    if lost <= allowed:
        return True, ""
    return False, (f"{correct} of {images} correct against the frozen graph's {reference_correct}: "
                   f"{lost} images lost, {precision} formats may lose {allowed:g}")


def latency_ms(runner, image, calls: int = DEFAULT_LATENCY_CALLS) -> float:
    """Median wall time (ms) of single-image calls, after a few warm-up calls."""
    for _ in range(_WARM_UP_CALLS):
        runner(image)
    times = []
    for _ in range(max(1, calls)):
        start = time.perf_counter()
        runner(image)
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


def validation_table(verdicts: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per format (and a header) for the task log."""
    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'format':16} {'runtime':12} {'precision':9} {'accuracy':>8} {'max_abs_diff':>12} "
             f"{'b1_ms':>7}  verdict"]
    reference = next(iter(verdicts.values()), {}).get("reference_accuracy")
    lines.append(f"{'(frozen graph)':16} {'tensorflow':12} {'float32':9} {number(reference, '8.4f')} "
                 f"{'-':>12} {'-':>7}  reference")
    for name, entry in verdicts.items():
        lines.append(
            f"{name:16} {entry.get('runtime') or '-':12} {entry.get('precision') or '-':9} "
            f"{number(entry.get('accuracy'), '8.4f')} {number(entry.get('max_abs_diff'), '12.3g')} "
            f"{number(entry.get('latency_ms_b1'), '7.2f')}  "
            + ("accepted" if entry.get("accepted") else f"withheld: {entry.get('reason')}")
        )
    return "\n".join(lines)


def _open(metadata: Mapping[str, Any], folder: Path, threads: int | None):
    from headpose.edge.runtimes import open_runner

    return open_runner(metadata, folder, threads)


def _check_files(files: Mapping[str, Mapping[str, str]]) -> None:
    for name, entry in files.items():
        path = Path(entry["path"])
        if not path.is_file():
            raise EdgeFormatError(f"{name} is missing")
        actual, _ = file_digest(path)
        if actual != entry["sha256"]:
            raise EdgeFormatError(f"{name} has sha256 {actual}, edge_models.json records {entry['sha256']}")


def _score(runner, images, labels, reference, score: dict) -> str | None:
    """Add one batch to a format's score; the problem if its output is unusable."""
    import numpy as np

    try:
        output = np.asarray(runner(images), dtype=np.float32)
    except Exception as error:  # a runtime failing mid-way withholds the format only
        return f"running it failed: {_text(error)}"
    if output.shape != reference.shape:
        return f"gives outputs of shape {list(output.shape)}, the frozen graph {list(reference.shape)}"
    if not np.isfinite(output).all():
        return "gives non-finite outputs"
    score["correct"] += int((output.argmax(axis=1) == labels).sum())
    diff = float(np.max(np.abs(output - reference)))
    score["max_abs_diff"] = max(score["max_abs_diff"], diff if math.isfinite(diff) else math.inf)
    return None


def _withheld(runtime: str | None, precision: str | None, files: Mapping, reason: str) -> dict[str, Any]:
    return {"runtime": runtime, "precision": precision, "accuracy": None, "max_abs_diff": None,
            "latency_ms_b1": None, "accepted": False, "reason": reason, "files": dict(files)}


def _text(error: Exception) -> str:
    known = (EdgeFormatError, EdgeClientError, ValueError)
    return str(error) if isinstance(error, known) else f"{type(error).__name__}: {error}"
