"""The settings that name a staged dataset, standard library only.

``plan_run`` derives a dataset's S3 prefix from a hash of these at parse-light cost:
importing the generator or the converter would bring numpy and TensorFlow with them.

``channel_order`` is one of them: the order in which every dataset writer stores a pixel's
three channels. ``bgr`` by default, because the tutorial trained on BGR (it read images
with OpenCV) and its DeepLens consumer feeds the model OpenCV frames unconverted. The
shards do not record it; the manifest beside them does, as ``"channel_order"``.
"""
from __future__ import annotations

from typing import Any, Mapping, TypeVar

# Bump when the synthetic generator's output changes, so that staged datasets get a new prefix.
# 2: every round of poses draws from its own random stream (parallel rendering).
# 3: pixels are stored in ``channel_order`` (default bgr; 2 always wrote RGB).
GENERATOR_VERSION = 3

CHANNEL_ORDERS: tuple[str, ...] = ("bgr", "rgb")
DEFAULT_CHANNEL_ORDER = "bgr"

Pixels = TypeVar("Pixels")


def checked_channel_order(value: Any) -> str:
    """``value`` if it is a channel order (``bgr`` or ``rgb``), else ValueError saying so."""
    if value not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order must be one of {', '.join(CHANNEL_ORDERS)}, got {value!r}")
    return value


def from_rgb(image: Pixels, channel_order: str) -> Pixels:
    """An RGB array (channels last) in ``channel_order``: a reversed view for ``bgr``."""
    return image[..., ::-1] if checked_channel_order(channel_order) == "bgr" else image


def channel_order_of(params: Mapping[str, Any]) -> str:
    """The run's ``channel_order``; ``bgr`` for params from before the setting existed."""
    return checked_channel_order(params.get("channel_order", DEFAULT_CHANNEL_ORDER))


def synthetic_settings(params: Mapping[str, Any], generator_version: int) -> dict[str, Any]:
    """The settings that define a synthetic dataset (and its prefix's hash)."""
    return {
        "generator_version": generator_version,
        "train_per_pose": int(params["synthetic_train_per_pose"]),
        "eval_per_pose": int(params["synthetic_eval_per_pose"]),
        "seed": int(params["seed"]),
        "images_per_shard": int(params["images_per_shard"]),
        "channel_order": channel_order_of(params),
    }


def prima_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that define a Prima dataset (and, with the archive URI, its prefix)."""
    return {
        "archive_uri": str(params["prima_archive_uri"]),
        "num_data_aug": int(params["prima_num_data_aug"]),
        "num_eval_aug": int(params["prima_num_eval_aug"]),
        "seed": int(params["seed"]),
        "images_per_shard": int(params["images_per_shard"]),
        "channel_order": channel_order_of(params),
    }
