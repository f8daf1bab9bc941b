"""Staging the synthetic dataset into a real (moto) S3, with and without the render cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from headpose.datasets import settings as dataset_settings, staging
from headpose.planning.layout import file_sha256, split_s3_uri
from headpose.datasets.settings import GENERATOR_VERSION

BUCKET = "staging-test"
SETTINGS = dataset_settings.synthetic_settings(
    {"synthetic_train_per_pose": 1, "synthetic_eval_per_pose": 1, "seed": 3, "images_per_shard": 50},
    GENERATOR_VERSION,
)


@pytest.fixture()
def bucket(s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    return s3_client


def _staged_sha256(s3, prefix_uri: str, folder) -> dict[str, str]:
    """sha256 of every object under the prefix, as downloaded into ``folder``."""
    bucket, key_prefix = split_s3_uri(prefix_uri)
    folder.mkdir()
    found = {}
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=key_prefix)["Contents"]:
        path = folder / item["Key"].rsplit("/", 1)[-1]
        s3.download_file(bucket, item["Key"], str(path))
        found[path.name] = file_sha256(path)
    return found


def test_a_cached_render_is_uploaded_again_without_rendering(bucket, tmp_path):
    cache = tmp_path / "cache"
    logs: list[str] = []
    first = staging.stage_synthetic_dataset(bucket, f"s3://{BUCKET}/a/", SETTINGS, logs.append,
                                            cache_root=cache)
    assert first["staged"] and first["train_count"] == 93
    assert any("generating" in line for line in logs)
    (folder,) = [p for p in cache.iterdir()]
    assert folder.name.startswith("synthetic-") and not folder.name.startswith(".")
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    logs.clear()  # an S3 that forgot the dataset (the embedded one after a restart)
    second = staging.stage_synthetic_dataset(bucket, f"s3://{BUCKET}/b/", SETTINGS, logs.append,
                                             cache_root=cache)
    assert second["staged"] and not any("generating" in line for line in logs)
    assert any("reusing" in line for line in logs)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    a = _staged_sha256(bucket, f"s3://{BUCKET}/a/", tmp_path / "a")
    b = _staged_sha256(bucket, f"s3://{BUCKET}/b/", tmp_path / "b")
    assert a == b and "manifest.json" in a and len(a) == 5  # 2 train + 2 eval shards + manifest


def test_a_damaged_cache_is_rendered_again_not_uploaded(bucket, tmp_path):
    cache = tmp_path / "cache"
    staging.stage_synthetic_dataset(bucket, f"s3://{BUCKET}/good/", SETTINGS, print, cache_root=cache)
    (folder,) = list(cache.iterdir())
    shard = sorted(folder.glob("train-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")

    logs: list[str] = []
    staging.stage_synthetic_dataset(bucket, f"s3://{BUCKET}/again/", SETTINGS, logs.append,
                                    cache_root=cache)
    assert any("does not match its sha256" in line for line in logs)
    assert any("generating" in line for line in logs)
    manifest = json.loads((folder / "manifest.json").read_text())
    expected = {s["file"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}
    staged = _staged_sha256(bucket, f"s3://{BUCKET}/again/", tmp_path / "again")
    assert {name: staged[name] for name in expected} == expected
    assert not [p for p in cache.iterdir() if p.name.startswith(".rendering-")]


def test_without_a_cache_nothing_is_kept(bucket, tmp_path, monkeypatch):
    monkeypatch.delenv(staging.SYNTHETIC_CACHE_ENV, raising=False)
    assert staging.synthetic_cache_root() is None
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    staging.stage_synthetic_dataset(bucket, f"s3://{BUCKET}/plain/", SETTINGS, print,
                                    scratch_root=scratch, cache_root=staging.synthetic_cache_root())
    assert list(scratch.iterdir()) == []
    monkeypatch.setenv(staging.SYNTHETIC_CACHE_ENV, str(tmp_path / "c"))
    assert staging.synthetic_cache_root() == tmp_path / "c"


# -- dataset validation: refused before training, with the figures ---------------------

def _dataset(s3, tmp_path, name: str, eval_poses, image=None, manifest_edit=None) -> str:
    """A dataset prefix written with the project's ShardWriter: full train split, ``eval_poses`` held out."""
    import numpy as np

    from headpose.datasets.store import upload_manifest, upload_shards
    from headpose.datasets.synthetic import prima_poses
    from headpose.training.shards import ShardWriter

    folder = tmp_path / name
    rng = np.random.default_rng(1)
    draw = image or (lambda: rng.integers(30, 220, (84, 84, 3), dtype=np.uint8))
    splits = {}
    for split, poses in (("train", prima_poses()), ("eval", eval_poses)):
        with ShardWriter(folder, split, images_per_shard=64) as writer:
            for tilt, pan in poses:
                writer.write(draw(), tilt, pan)
        splits[split] = writer.summary()
    manifest = {"source": "test", "channel_order": "bgr", "splits": splits}
    if manifest_edit:
        manifest_edit(manifest)
    prefix = f"s3://{BUCKET}/headpose/datasets/{name}/"
    upload_shards(s3, folder, prefix)
    upload_manifest(s3, manifest, prefix)
    return prefix


def test_a_dataset_missing_a_class_is_refused_with_the_figures(bucket, tmp_path):
    from headpose.datasets.store import DatasetError
    from headpose.datasets.synthetic import prima_poses

    no_frontal = [(t, p) for t, p in prima_poses() if not (abs(t) < 20 and abs(p) < 20)]
    prefix = _dataset(bucket, tmp_path, "no-centre", no_frontal)
    with pytest.raises(DatasetError) as refused:
        staging.check_dataset_prefix(bucket, prefix, print, scratch_root=tmp_path)
    message = str(refused.value)
    assert "the eval split lacks classes ['pan=centre/tilt=centre']" in message
    assert "training was not started" in message and '"classes_present": 8' in message


def test_flat_images_and_an_empty_split_are_refused(bucket, tmp_path):
    import numpy as np

    from headpose.datasets.store import DatasetError
    from headpose.datasets.synthetic import prima_poses

    flat = _dataset(bucket, tmp_path, "flat", prima_poses(), image=lambda: np.full((84, 84, 3), 128, np.uint8))
    with pytest.raises(DatasetError, match="93 of 93 train images are one flat colour"):
        staging.check_dataset_prefix(bucket, flat, print, scratch_root=tmp_path)
    empty = _dataset(bucket, tmp_path, "empty-eval", [])
    with pytest.raises(DatasetError, match=r"has no eval-\*\.tfrecord"):  # a degenerate split
        staging.check_dataset_prefix(bucket, empty, print, scratch_root=tmp_path)


def test_a_shard_that_is_not_the_one_the_manifest_names_is_refused(bucket, tmp_path):
    from headpose.datasets.store import DatasetError
    from headpose.datasets.synthetic import prima_poses

    def miscount(manifest):
        manifest["splits"]["eval"]["count"] = 94

    prefix = _dataset(bucket, tmp_path, "miscounted", prima_poses(), manifest_edit=miscount)
    with pytest.raises(DatasetError, match="the eval shards hold 93 records, the manifest says 94"):
        staging.check_dataset_prefix(bucket, prefix, print, scratch_root=tmp_path)


def test_a_staged_dataset_carries_its_figures_and_is_rechecked_by_etag(bucket, tmp_path):
    from headpose.datasets.store import DatasetError, read_manifest

    prefix = f"s3://{BUCKET}/checked/"
    # Rendered once per session (the session's cache): what is under test is the validation.
    staged = staging.stage_synthetic_dataset(bucket, prefix, SETTINGS, print, scratch_root=tmp_path,
                                             cache_root=staging.synthetic_cache_root())
    manifest, sha256 = read_manifest(bucket, prefix)
    assert manifest["validation"]["splits"] == staged["validation"] and staged["manifest_sha256"] == sha256
    assert set(manifest["validation"]["etags"]) == {s["file"] for sp in manifest["splits"].values() for s in sp["shards"]}
    logs: list[str] = []
    again = staging.stage_synthetic_dataset(bucket, prefix, SETTINGS, logs.append, scratch_root=tmp_path,
                                            cache_root=staging.synthetic_cache_root())
    assert again["validation"] == staged["validation"]
    assert any("unchanged since it was validated" in line for line in logs)
    # A shard replaced behind the manifest's back: its ETag no longer matches, so it is
    # downloaded and checked - and refused, because its sha256 is not the manifest's.
    _, key_prefix = split_s3_uri(prefix)
    bucket.put_object(Bucket=BUCKET, Key=key_prefix + "eval-00000.tfrecord", Body=b"\x00" * 64)
    with pytest.raises(DatasetError, match="eval shard eval-00000.tfrecord has sha256"):
        staging.stage_synthetic_dataset(bucket, prefix, SETTINGS, print, scratch_root=tmp_path,
                                        cache_root=staging.synthetic_cache_root())


def test_a_shard_the_manifest_does_not_name_is_refused_even_after_validation(bucket, tmp_path):
    from headpose.datasets.store import DatasetError

    prefix = f"s3://{BUCKET}/stray/"
    staging.stage_synthetic_dataset(bucket, prefix, SETTINGS, print, scratch_root=tmp_path,
                                    cache_root=staging.synthetic_cache_root())
    # The channel hands training every shard under the prefix; one dropped in beside the
    # validated ones (its ETag is in no record) would be trained on unchecked.
    _, key_prefix = split_s3_uri(prefix)
    bucket.put_object(Bucket=BUCKET, Key=key_prefix + "train-00099.tfrecord", Body=b"\x00garbage" * 64)
    with pytest.raises(DatasetError, match=r"train-00099.tfrecord under the prefix is not in manifest.json"):
        staging.check_dataset_prefix(bucket, prefix, print, scratch_root=tmp_path)


def test_a_dataset_in_the_other_channel_order_is_refused(bucket, tmp_path):
    from headpose.datasets.store import DatasetError
    from headpose.datasets.synthetic import prima_poses

    prefix = _dataset(bucket, tmp_path, "bgr-set", prima_poses())
    plan = {"bucket": BUCKET, "dataset_prefix": prefix,
            "run_params": {"dataset_source": prefix, "channel_order": "rgb"}}
    with pytest.raises(DatasetError, match="holds BGR images but this run's channel_order is 'rgb'"):
        staging.stage_dataset(bucket, plan, print, scratch_root=tmp_path)


def test_a_dataset_with_fewer_training_shards_than_hosts_is_refused(bucket, tmp_path):
    from headpose.datasets.store import DatasetError
    from headpose.datasets.synthetic import prima_poses

    prefix = _dataset(bucket, tmp_path, "two-shards", prima_poses())  # 93 images, 64 a shard
    plan = {"bucket": BUCKET, "dataset_prefix": prefix,
            "run_params": {"dataset_source": prefix, "channel_order": "bgr", "instance_count": 2}}
    assert staging.stage_dataset(bucket, plan, print, scratch_root=tmp_path)["train_shards"] == 2
    plan["run_params"]["instance_count"] = 3
    with pytest.raises(DatasetError, match=r"has 2 training shard\(s\) for instance_count=3: every host needs one"):
        staging.stage_dataset(bucket, plan, print, scratch_root=tmp_path)


def _render_in_a_daemon(folder: str, queue) -> None:
    logs: list[str] = []
    settings = {**SETTINGS, "train_per_pose": 2, "eval_per_pose": 2}
    staging._render_synthetic(Path(folder), settings, logs.append)
    queue.put(logs)


def test_rendering_uses_a_process_pool_inside_a_daemonic_process(tmp_path):
    """A Celery prefork worker is a daemonic process, which may not start a pool of its own."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=_render_in_a_daemon, args=(str(tmp_path / "out"), queue), daemon=True)
    worker.start()
    logs = queue.get(timeout=600)
    worker.join(60)
    assert worker.exitcode == 0
    assert "rendered 4 rounds of 93 poses in 2 processes" in logs, logs
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 2 * 93 and manifest["channel_order"] == "bgr"
