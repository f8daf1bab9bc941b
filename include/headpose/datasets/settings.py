"""The settings that name a staged dataset, standard library only.

``plan_run`` derives a dataset's S3 prefix from a hash of these at parse-light cost:
importing the generator or the converter would bring numpy and TensorFlow with them.
"""
from __future__ import annotations

from typing import Any, Mapping

# Bump when the synthetic generator's output changes, so that staged datasets get a new prefix.
# 2: every round of poses draws from its own random stream (parallel rendering).
GENERATOR_VERSION = 2


def synthetic_settings(params: Mapping[str, Any], generator_version: int) -> dict[str, int]:
    """The settings that define a synthetic dataset (and its prefix's hash)."""
    return {
        "generator_version": generator_version,
        "train_per_pose": int(params["synthetic_train_per_pose"]),
        "eval_per_pose": int(params["synthetic_eval_per_pose"]),
        "seed": int(params["seed"]),
        "images_per_shard": int(params["images_per_shard"]),
    }


def prima_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that define a Prima dataset (and, with the archive URI, its prefix)."""
    return {
        "archive_uri": str(params["prima_archive_uri"]),
        "num_data_aug": int(params["prima_num_data_aug"]),
        "num_eval_aug": int(params["prima_num_eval_aug"]),
        "seed": int(params["seed"]),
        "images_per_shard": int(params["images_per_shard"]),
    }
