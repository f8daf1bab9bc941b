"""The settings that name a staged dataset: channel_order among them, and its default."""
from __future__ import annotations

import numpy as np
import pytest

from headpose.datasets import settings
from headpose.planning.layout import dataset_id

SYNTHETIC = {"synthetic_train_per_pose": 2, "synthetic_eval_per_pose": 1, "seed": 0,
             "images_per_shard": 100}
PRIMA = {"prima_archive_uri": "s3://raw/HeadPoseImageDatabase.tar.gz", "prima_num_data_aug": 15,
         "prima_num_eval_aug": 3, "seed": 0, "images_per_shard": 1000}


def test_params_without_channel_order_mean_bgr():
    assert settings.synthetic_settings(SYNTHETIC, settings.GENERATOR_VERSION)["channel_order"] == "bgr"
    assert settings.prima_settings(PRIMA)["channel_order"] == "bgr"


@pytest.mark.parametrize("name, build", [
    ("synthetic", lambda p: settings.synthetic_settings(p, settings.GENERATOR_VERSION)),
    ("prima", settings.prima_settings),
])
def test_each_channel_order_names_its_own_dataset_prefix(name, build):
    base = SYNTHETIC if name == "synthetic" else PRIMA
    ids = {order: dataset_id(name, build({**base, "channel_order": order})) for order in ("bgr", "rgb")}
    assert ids["bgr"] != ids["rgb"]
    assert dataset_id(name, build(base)) == ids["bgr"]


@pytest.mark.parametrize("value", ["RGB", "bgra", "", None])
def test_an_unknown_channel_order_is_refused(value):
    with pytest.raises(ValueError, match="channel_order must be one of bgr, rgb"):
        settings.prima_settings({**PRIMA, "channel_order": value})


def test_from_rgb_reverses_the_channel_axis_for_bgr_only():
    rgb = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    assert settings.from_rgb(rgb, "rgb") is rgb
    bgr = settings.from_rgb(rgb, "bgr")
    assert bgr.tolist() == [[[2, 1, 0], [5, 4, 3]], [[8, 7, 6], [11, 10, 9]]]
    batch = np.stack([rgb, rgb + 100])
    assert settings.from_rgb(batch, "bgr")[1, 0, 0].tolist() == [102, 101, 100]
