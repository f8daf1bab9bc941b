"""The synthetic head-pose dataset: images, poses, mirror consistency, shards, CLI."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from headpose.datasets import rendering, synthetic
from headpose.training import labels

ROOT = Path(__file__).resolve().parents[1]


def _image(seed: int, tilt: float, pan: float, size: int = 84) -> np.ndarray:
    return rendering.generate_image(np.random.default_rng(seed), tilt, pan, size)


def test_image_is_uint8_rgb_of_the_requested_size():
    image = _image(0, 15, -30)
    assert image.shape == (84, 84, 3) and image.dtype == np.uint8
    assert _image(0, 0, 0, size=48).shape == (48, 48, 3)
    assert image.std() > 10  # not a blank frame


def test_same_seed_same_bytes_other_seed_other_image():
    assert _image(7, 30, 45).tobytes() == _image(7, 30, 45).tobytes()
    assert _image(7, 30, 45).tobytes() != _image(8, 30, 45).tobytes()


def test_poses_are_the_prima_grid():
    poses = synthetic.prima_poses()
    assert len(poses) == len(set(poses)) == 93
    assert {t for t, _ in poses} == set(labels.TILT_ANGLES)
    assert {p for _, p in poses} == set(labels.PAN_ANGLES)
    assert [(t, p) for t, p in poses if abs(t) == 90] == [(-90, 0), (90, 0)]


@pytest.mark.parametrize("tilt", [-90, -30, 0, 15, 60])
@pytest.mark.parametrize("pan", [15, 30, 75, 90])
def test_flipped_image_at_pan_is_the_image_at_minus_pan(tilt, pan):
    # What the training pipeline's mirror augmentation (flip, negate pan) relies on. The
    # renderer draws pan -p from its own 3D geometry, not by flipping, so this checks it.
    for seed in (1, 2):
        flipped = _image(seed, tilt, pan)[:, ::-1].astype(int)
        mirrored = _image(seed, tilt, -pan).astype(int)
        assert np.abs(flipped - mirrored).max() <= 1


@pytest.mark.parametrize(
    "pose_a, pose_b", [((0, 15), (0, 30)), ((15, 0), (30, 0)), ((-15, 0), (-30, 0)), ((0, 0), (0, 15))]
)
def test_neighbouring_poses_draw_different_heads(pose_a, pose_b):
    # 15 and 30 degrees fall in different bins; the same head must look different.
    a, b = _image(3, *pose_a).astype(int), _image(3, *pose_b).astype(int)
    assert np.abs(a - b).mean() > 2


def _expected_per_class(per_pose: int) -> list[int]:
    counts = Counter(
        labels.class_index(labels.normalise(t), labels.normalise(p)) for t, p in synthetic.prima_poses()
    )
    return [counts[c] * per_pose for c in range(labels.NUM_CLASSES)]


def _records(directory: Path, split: str) -> list[tuple[bytes, float, float]]:
    import tensorflow as tf

    from headpose.training import shards

    features = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "tilt": tf.io.FixedLenFeature([], tf.float32),
        "pan": tf.io.FixedLenFeature([], tf.float32),
    }
    records = []
    for path in shards.shard_paths(directory, split):
        for raw in tf.data.TFRecordDataset(str(path)):
            parsed = tf.io.parse_single_example(raw, features)
            records.append(
                (parsed["image"].numpy(), float(parsed["tilt"]), float(parsed["pan"]))
            )
    return records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    manifest = synthetic.write_synthetic_dataset(
        out, train_per_pose=2, eval_per_pose=1, seed=5, images_per_shard=80
    )
    return out, manifest


def test_manifest_counts_match_the_records(dataset):
    out, manifest = dataset
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["source"] == "synthetic"
    assert manifest["settings"]["generator_version"] == synthetic.GENERATOR_VERSION
    for split, per_pose in (("train", 2), ("eval", 1)):
        summary = manifest["splits"][split]
        records = _records(out, split)
        assert summary["count"] == len(records) == 93 * per_pose
        assert summary["per_class"] == _expected_per_class(per_pose)
        read_classes = Counter(labels.class_index(t, p) for _, t, p in records)
        assert summary["per_class"] == [read_classes[c] for c in range(labels.NUM_CLASSES)]
        assert [s["file"] for s in summary["shards"]] == [
            p.name for p in sorted(out.glob(f"{split}-*.tfrecord"))
        ]
        assert sum(s["count"] for s in summary["shards"]) == summary["count"]
        assert all(s["count"] <= 80 for s in summary["shards"])


def test_every_shard_mixes_poses_and_images_are_valid(dataset):
    out, _ = dataset
    records = _records(out, "train")
    first_shard = records[:80]
    assert len({(t, p) for _, t, p in first_shard}) == 80  # interleaved, not grouped by pose
    assert all(len(image) == 84 * 84 * 3 for image, _, _ in records)
    assert {(round(t * 90), round(p * 90)) for _, t, p in records} == set(synthetic.prima_poses())


def test_eval_images_are_held_out(dataset):
    out, _ = dataset
    train = {image for image, _, _ in _records(out, "train")}
    evaluation = {image for image, _, _ in _records(out, "eval")}
    assert len(train) == 2 * 93 and len(evaluation) == 93
    assert not train & evaluation


def test_dataset_is_reproducible_from_its_seed(dataset, tmp_path):
    # Every round of poses has its own random stream, so a smaller dataset with the same
    # seed is exactly the first rounds of a larger one.
    out, _ = dataset
    synthetic.write_synthetic_dataset(tmp_path, train_per_pose=1, eval_per_pose=1, seed=5)
    assert _records(tmp_path, "train") == _records(out, "train")[:93]
    assert _records(tmp_path, "eval") == _records(out, "eval")


def test_bytes_do_not_depend_on_the_number_of_rendering_processes(tmp_path):
    manifests = {
        workers: synthetic.write_synthetic_dataset(
            tmp_path / str(workers), train_per_pose=3, eval_per_pose=2, seed=9,
            images_per_shard=100, workers=workers,
        )
        for workers in (1, 3)
    }
    assert manifests[1]["splits"] == manifests[3]["splits"]  # shard names, counts, sha256
    assert [s["count"] for s in manifests[1]["splits"]["train"]["shards"]] == [100, 100, 79]


def test_bgr_shards_are_the_rgb_shards_with_channels_reversed(dataset, tmp_path):
    out, manifest = dataset  # written with the default order
    assert (manifest["channel_order"], manifest["image"]["channels"]) == ("bgr", "BGR")
    rgb = synthetic.write_synthetic_dataset(tmp_path, train_per_pose=2, eval_per_pose=1, seed=5,
                                            images_per_shard=80, channel_order="rgb")
    assert (rgb["channel_order"], rgb["image"]["channels"]) == ("rgb", "RGB")
    assert rgb["settings"]["channel_order"] == "rgb" and manifest["settings"]["channel_order"] == "bgr"
    for split in ("train", "eval"):
        bgr_records, rgb_records = _records(out, split), _records(tmp_path, split)
        assert len(bgr_records) == len(rgb_records) == manifest["splits"][split]["count"]
        for (bgr_image, *bgr_pose), (rgb_image, *rgb_pose) in zip(bgr_records, rgb_records):
            assert bgr_pose == rgb_pose
            as_array = lambda raw: np.frombuffer(raw, np.uint8).reshape(84, 84, 3)  # noqa: E731
            np.testing.assert_array_equal(as_array(bgr_image), as_array(rgb_image)[..., ::-1])
    # The renderer draws RGB: rgb shards hold its pixels as drawn.
    assert _records(tmp_path, "train")[0][0] == synthetic.render_round(5, "train", 0)[0].tobytes()


def test_rejects_an_unknown_channel_order(tmp_path):
    with pytest.raises(ValueError, match="channel_order must be one of bgr, rgb, got 'RGB'"):
        synthetic.write_synthetic_dataset(tmp_path, 1, 1, channel_order="RGB")
    assert not list(tmp_path.iterdir())


def test_rejects_empty_splits(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        synthetic.write_synthetic_dataset(tmp_path, train_per_pose=0, eval_per_pose=1)


def test_cli_help_describes_every_argument():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include")}
    result = subprocess.run(
        [sys.executable, "-m", "headpose.datasets.synthetic", "--help"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    )
    for flag in ("--out", "--train-per-pose", "--eval-per-pose", "--seed", "--images-per-shard",
                 "--channel-order {bgr,rgb}"):
        assert flag in result.stdout
    assert "held-out" in result.stdout


def test_cli_writes_a_dataset(dataset, tmp_path, capsys):
    out, _ = dataset
    assert synthetic.main(
        ["--out", str(tmp_path), "--train-per-pose", "1", "--eval-per-pose", "1", "--seed", "3",
         "--channel-order", "rgb"]
    ) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"] == {"train": 93, "eval": 93}
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert written["settings"]["seed"] == 3 and written["channel_order"] == "rgb"
    other_seed = {image for image, _, _ in _records(tmp_path, "eval")}
    assert not other_seed & {image for image, _, _ in _records(out, "eval")}
