"""A run's data version: what it trains on, with the settings that shape the dataset and the model.

``data_version_id`` hashes the sha256 of the source - the Prima archive's bytes, the staged
dataset's ``manifest.json`` (which names every shard by its sha256), or for the synthetic
generator its settings, which decide every pixel - together with ``version_settings``.
The same bytes uploaded again, under any key, are the same version; a new archive, or a
profile that trains differently (more steps, another depth, another seed...), is a new one.

What does not shape what is learnt stays out: where and how fast it trains (backend,
instance, spot, precision and XLA, which export the same float32 model), how it is
judged (``min_accuracy``, ``promotion_margin``...), and where things are written.
Standard library only.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

# Run parameters that change the trained model, whatever the data.
TRAINING_SETTINGS = (
    "resnet_size", "base_filters", "training_steps", "batch_size", "learning_rate_decay_epochs",
    "batch_norm_momentum", "seed", "channel_order",
)
# ...and those that change the dataset a source is turned into (the Prima converter's crops).
PRIMA_SETTINGS = ("prima_num_data_aug", "prima_num_eval_aug", "images_per_shard")
SOURCE_KINDS = ("prima_archive", "manifest", "synthetic")


def source_kind(params: Mapping[str, Any]) -> str:
    """Which bytes a run's data version is the sha256 of, by its ``dataset_source``."""
    source = params["dataset_source"]
    return {"prima": "prima_archive", "synthetic": "synthetic"}.get(source, "manifest")


def source_uri(params: Mapping[str, Any]) -> str | None:
    """The object whose sha256 is hashed (None for the synthetic generator: its settings are)."""
    kind = source_kind(params)
    if kind == "prima_archive":
        return params["prima_archive_uri"]
    if kind == "manifest":
        return params["dataset_source"].rstrip("/") + "/manifest.json"
    return None


def version_settings(params: Mapping[str, Any], dataset_settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings hashed with the source: training's always, the converter's for an archive."""
    kind = source_kind(params)
    names = TRAINING_SETTINGS + (PRIMA_SETTINGS if kind == "prima_archive" else ())
    settings = {name: params[name] for name in names}
    if kind == "synthetic":  # the generator's settings (its version included) are the data itself
        settings["synthetic"] = dict(dataset_settings or {})
    return settings


def data_version_plan(
    params: Mapping[str, Any], dataset_settings: Mapping[str, Any] | None, *, enforced: bool,
) -> dict[str, Any]:
    """``plan_run``'s ``data_version`` entry: what ``claim_data_version`` hashes and claims.

    ``enforced``: whether this run claims its version and skips one already trained (runs
    started by the schedule or by data; any run of a deployment that retrains on data).
    """
    return {"enforced": enforced, "force_retrain": bool(params.get("force_retrain")),
            "kind": source_kind(params), "source_uri": source_uri(params),
            "settings": version_settings(params, dataset_settings)}


def synthetic_sha256(settings: Mapping[str, Any]) -> str:
    """The synthetic dataset's stand-in for a file's sha256: its generator settings, canonical."""
    return hashlib.sha256(_canonical(settings.get("synthetic", {}))).hexdigest()


def data_version_id(kind: str, sha256: str, settings: Mapping[str, Any]) -> str:
    """``dv-<24 hex>``: the same source bytes with the same settings, whatever their key."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r}")
    digest = hashlib.sha256(_canonical({"kind": kind, "sha256": sha256, "settings": dict(settings)})).hexdigest()
    return "dv-" + digest[:24]


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
