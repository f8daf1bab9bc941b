"""The TFRecord shard format: write, read back, mirror augmentation."""
import numpy as np
import pytest

from headpose.training import labels, shards


def _image(value: int) -> np.ndarray:
    image = np.zeros((84, 84, 3), np.uint8)
    image[:, :42] = value  # left half bright: a flip is visible
    return image


@pytest.fixture()
def written(tmp_path):
    poses = [(t, p) for t in (-30, 0, 30) for p in (-45, 0, 45)]
    with shards.ShardWriter(tmp_path, "eval", images_per_shard=4) as writer:
        for index, (tilt, pan) in enumerate(poses):
            writer.write(_image(10 + index), tilt, pan)
    return tmp_path, poses, writer.summary()


def test_summary_counts_classes_and_checksums_each_shard(written):
    directory, poses, summary = written
    assert summary["count"] == 9
    assert summary["per_class"] == [1] * 9
    assert [s["file"] for s in summary["shards"]] == [
        "eval-00000.tfrecord", "eval-00001.tfrecord", "eval-00002.tfrecord"]
    assert [s["count"] for s in summary["shards"]] == [4, 4, 1]
    for shard in summary["shards"]:
        assert shard["sha256"] == shards.file_sha256(directory / shard["file"])


def test_eval_dataset_reads_back_in_order(written):
    directory, poses, _ = written
    images, classes = next(iter(shards.dataset(shards.shard_paths(directory, "eval"), 16, training=False)))
    assert images.shape == (9, 84, 84, 3) and images.dtype.name == "float32"
    np.testing.assert_allclose(images.numpy()[:, 0, 0, 0], [(10 + i) / 255 for i in range(9)], rtol=1e-6)
    expected = [labels.class_index(labels.normalise(t), labels.normalise(p)) for t, p in poses]
    assert classes.numpy().tolist() == expected


def test_training_dataset_mirrors_image_and_pan_together(tmp_path):
    with shards.ShardWriter(tmp_path, "train") as writer:
        writer.write(_image(200), 0, 45)  # class pan=positive/tilt=centre
    data = shards.dataset(shards.shard_paths(tmp_path, "train"), 1, training=True, seed=1)
    seen = set()
    for images, classes in data.take(40):
        left_bright = images[0, 0, 0, 0].numpy() > 0.5
        seen.add((bool(left_bright), int(classes[0])))
    # Unflipped: bright on the left and pan bin 2; flipped: bright on the right and pan bin 0.
    assert seen == {(True, 2 * 3 + 1), (False, 0 * 3 + 1)}


def test_writer_refuses_wrong_images(tmp_path):
    with shards.ShardWriter(tmp_path, "train") as writer:
        with pytest.raises(ValueError, match="uint8 HxWx3"):
            writer.write(np.zeros((84, 84), np.uint8), 0, 0)
        with pytest.raises(ValueError, match="uint8 HxWx3"):
            writer.write(np.zeros((84, 84, 3), np.float32), 0, 0)
    with pytest.raises(ValueError, match="split"):
        shards.ShardWriter(tmp_path, "test")
