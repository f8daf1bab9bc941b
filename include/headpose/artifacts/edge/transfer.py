"""The edge export as a pipeline task runs it: inputs from S3, outputs to S3, scratch only between.

Every download is checked by its sha256 (the frozen graph's from XCom, each training
shard's from the dataset manifest when it lists one); every file written is uploaded
under ``output_prefix``, ``edge_models.json`` last, so its presence means the formats it
lists are complete. What comes back is for XCom: names, URIs, sha256s, metadata.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from headpose.artifacts.edge.converter import EdgeFormatError
from headpose.artifacts.edge.export import (
    DEFAULT_FORMATS,
    DEFAULT_REPRESENTATIVE_IMAGES,
    EDGE_MODELS_FILE,
    export_edge_models,
    representative_images,
    requested_formats,
)
from headpose.planning.handoff import HandoffError, download_verified, upload_file
from headpose.planning.layout import FROZEN_MODEL_FILE, FROZEN_MODEL_JSON_FILE, MANIFEST_FILE, join_uri

DEFAULT_REPRESENTATIVE_SHARDS = 2
Log = Callable[[str], None]


class EdgeExportRefused(RuntimeError):
    """The inputs are refused or no format could be exported: retrying cannot help."""


def export_from_s3(
    s3_client: Any,
    scratch: str | Path,
    *,
    frozen_model_uri: str,
    frozen_model_sha256: str,
    frozen_model_json_uri: str,
    dataset_prefix: str,
    output_prefix: str,
    frozen_model_json_sha256: str | None = None,
    formats: Sequence[str] | str = DEFAULT_FORMATS,
    max_shards: int = DEFAULT_REPRESENTATIVE_SHARDS,
    max_images: int = DEFAULT_REPRESENTATIVE_IMAGES,
    log: Log = print,
) -> dict[str, Any]:
    """Export every format of the frozen graph at ``frozen_model_uri`` to ``output_prefix``.

    Returns ``{"formats": {name: {"files": {file: {"uri", "sha256"}}, "runtime",
    "precision", "metadata"}}, "refused": {name: reason}, "edge_models_json_uri",
    "edge_models_json_sha256"}``. Raises ``EdgeExportRefused`` for refused inputs and
    when no format at all could be exported; S3 errors propagate (a retry may help).
    """
    folder = Path(scratch)
    try:
        names = requested_formats(formats)
        pb = download_verified(s3_client, frozen_model_uri, folder / FROZEN_MODEL_FILE, frozen_model_sha256)
        json_path = download_verified(s3_client, frozen_model_json_uri, folder / FROZEN_MODEL_JSON_FILE,
                                      frozen_model_json_sha256)
        metadata = _json_object(json_path, frozen_model_json_uri)
        shards = download_train_shards(s3_client, dataset_prefix, folder / "shards", max_shards)
        log(f"Representative set: up to {max_images} images from {[p.name for p in shards]}")
        result = export_edge_models(pb, metadata, folder / "edge", representative_images(shards, max_images), names)
    except (HandoffError, EdgeFormatError, ValueError) as error:  # ValueError: formats, bad JSON
        raise EdgeExportRefused(str(error)) from None
    for reason in result.refused.values():
        log(f"Refused: {reason}")
    if not result.models:
        raise EdgeExportRefused(f"no edge format could be exported: {'; '.join(result.refused.values())}")
    return _upload(s3_client, result, output_prefix, log)


def download_train_shards(s3_client: Any, dataset_prefix: str, dest: str | Path, max_shards: int) -> list[Path]:
    """Up to ``max_shards`` ``train-*`` shards spread over the split, each checked against the manifest."""
    from headpose.datasets.store import DatasetError, download_split, read_manifest

    manifest, _ = read_manifest(s3_client, dataset_prefix)
    listed = ((manifest or {}).get("splits", {}).get("train") or {}).get("shards") or []
    if not listed:
        raise HandoffError(f"no train-*.tfrecord shards listed in {join_uri(dataset_prefix, MANIFEST_FILE)}")
    count = max(1, min(max_shards, len(listed)))
    picks = sorted({round(i * (len(listed) - 1) / max(1, count - 1)) for i in range(count)})
    sample = {**manifest, "splits": {"train": {"shards": [listed[i] for i in picks]}}}
    try:
        return download_split(s3_client, dataset_prefix, "train", dest, manifest=sample)
    except DatasetError as error:
        raise HandoffError(str(error)) from None


def download_edge_models(s3_client: Any, edge_models_json_uri: str, dest: str | Path,
                         sha256: str | None = None) -> dict[str, Any]:
    """``edge_models.json`` and every file it lists, into ``dest``, each checked; the manifest."""
    folder = Path(dest)
    manifest = _json_object(download_verified(s3_client, edge_models_json_uri, folder / EDGE_MODELS_FILE, sha256),
                            edge_models_json_uri)
    prefix = edge_models_json_uri.rsplit("/", 1)[0]
    files = {file: ref["sha256"] for entry in (manifest.get("formats") or {}).values()
             for file, ref in entry["files"].items()}
    for file, file_sha256 in files.items():
        if Path(file).name != file:
            raise HandoffError(f"{edge_models_json_uri} lists {file!r}, which is not a plain file name")
        download_verified(s3_client, join_uri(prefix, file), folder / file, file_sha256)
    return manifest


def _upload(s3_client: Any, result, output_prefix: str, log: Log) -> dict[str, Any]:
    uploaded: dict[str, dict[str, str]] = {}
    formats = {}
    for name, model in result.models.items():
        files = {}
        for edge_file in model.files:
            if edge_file.name not in uploaded:
                uri = join_uri(output_prefix, edge_file.name)
                sha256 = upload_file(s3_client, edge_file.path, uri)
                if sha256 != edge_file.sha256:
                    raise HandoffError(f"{edge_file.path} changed after {name} wrote it")
                uploaded[edge_file.name] = {"uri": uri, "sha256": sha256}
            files[edge_file.name] = dict(uploaded[edge_file.name])
        formats[name] = {"files": files, "runtime": model.runtime, "precision": model.precision,
                         "metadata": model.metadata}
        log(f"Exported {name} ({model.runtime}, {model.precision}): {', '.join(files)}")
    manifest_uri = join_uri(output_prefix, EDGE_MODELS_FILE)
    manifest_sha256 = upload_file(s3_client, result.manifest_path, manifest_uri)
    return {"formats": formats, "refused": dict(result.refused),
            "edge_models_json_uri": manifest_uri, "edge_models_json_sha256": manifest_sha256}


def _json_object(path: Path, uri: str) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{uri} is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{uri} holds no JSON object")
    return document
