"""The images every model of a run is judged on: the pinned evaluation set, or the run's eval split.

A deployment pins its evaluation set (the profile's ``evaluation_set``: an ``s3://``
prefix whose ``manifest.json`` lists ``eval-*.tfrecord`` shards with their sha256, such
as the prefix of a staged Prima dataset, whose eval split holds persons 05, 10 and 15).
Then the new model and the published one are both scored on exactly those images, run
after run, whatever each was trained on. Without one, the run's own eval split is used.
Every shard is checked against the manifest's sha256 as it is downloaded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from headpose.datasets.store import DatasetError, manifest_channel_order, download_split, read_manifest
from headpose.planning.layout import MANIFEST_FILE, join_uri


@dataclass(frozen=True)
class EvaluationSet:
    """Which images a model was judged on, as the report and the published record keep it."""

    id: str
    prefix: str
    manifest_uri: str
    manifest_sha256: str
    channel_order: str
    pinned: bool
    images: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fetch_evaluation_set(
    s3_client: Any, pinned_prefix: str | None, dataset: Mapping[str, Any], dest: str | Path,
) -> tuple[EvaluationSet, list[Path]]:
    """The evaluation set's description and its shards downloaded (verified) into ``dest``.

    ``dataset`` is ``stage_dataset``'s summary of the run's dataset: without a pinned set,
    its eval split is used, and its manifest must still be the one that was validated.
    """
    prefix = (pinned_prefix.rstrip("/") + "/") if pinned_prefix else dataset["dataset_prefix"]
    manifest, sha256 = read_manifest(s3_client, prefix)
    if manifest is None:
        raise DatasetError(f"the evaluation set {prefix} has no {MANIFEST_FILE}")
    if not pinned_prefix and sha256 != dataset["manifest_sha256"]:
        raise DatasetError(
            f"{join_uri(prefix, MANIFEST_FILE)} changed since stage_dataset validated it "
            f"(sha256 {sha256}, validated {dataset['manifest_sha256']})"
        )
    shards = download_split(s3_client, prefix, "eval", dest, manifest=manifest)
    name = prefix.rstrip("/").rsplit("/", 1)[-1]
    evaluation_set = EvaluationSet(
        id=f"{name}@{sha256[:12]}",
        prefix=prefix,
        manifest_uri=join_uri(prefix, MANIFEST_FILE),
        manifest_sha256=sha256,
        channel_order=manifest_channel_order(manifest),
        pinned=bool(pinned_prefix),
        images=(manifest.get("splits", {}).get("eval") or {}).get("count"),
    )
    return evaluation_set, shards
