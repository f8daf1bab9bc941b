"""Staging the synthetic dataset into a real (moto) S3, with and without the render cache."""
from __future__ import annotations

import json

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
