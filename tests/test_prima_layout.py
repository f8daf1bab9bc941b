"""The Prima converter on an archive in the real database's layout, and staging it from S3.

The generated archive (``tests/prima_archive_support.py``, defaults): Person01 trains and
Person05 is held out, two series of 93 images each, so 372 images; ``Front/`` holds one
frontal image and its ``.txt`` per person and series (8 members); 5 stray files (a README,
``.DS_Store`` files, an AppleDouble ``._`` file, a file in another folder); in every series
images 00, 46 and 92 have face boxes past the frame's top-left corner (12 boxes); odd
numbered annotations end their lines in CRLF, the others in LF.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import tensorflow as tf

from headpose.datasets import prima, prima_archive, store
from prima_archive_support import (
    POSE_GRID,
    annotation,
    file_stem,
    link,
    real_layout_members,
    write_archive,
)

ROOT = Path(__file__).resolve().parents[1]
FEW_CROPS = {"num_data_aug": 2, "num_eval_aug": 1}


@pytest.fixture(scope="module")
def members():
    return real_layout_members()


@pytest.fixture(scope="module")
def archive(members, tmp_path_factory) -> Path:
    return write_archive(tmp_path_factory.mktemp("real") / "HeadPoseImageDatabase.tar.gz", members)


def _replaced(members, name: str, data: bytes | None):
    """``members`` with ``name``'s data replaced, or without ``name`` when ``data`` is None."""
    assert name in dict(members)
    return [(n, data if n == name else d) for n, d in members if n != name or data is not None]


def _poses(directory: Path, split: str) -> Counter:
    files = [str(p) for p in sorted(directory.glob(f"{split}-*.tfrecord"))]
    found = Counter()
    for raw in tf.data.TFRecordDataset(files):
        feature = tf.train.Example.FromString(raw.numpy()).features.feature
        found[(round(feature["tilt"].float_list.value[0] * 90),
               round(feature["pan"].float_list.value[0] * 90))] += 1
    return found


def test_generated_names_follow_the_databases_own_examples():
    # The database's page: person08123-30+45 (image 23 of series 1) and the Front/ folder's
    # personne01146+0+0; the tutorial's README: person01157+15-30.
    assert file_stem(8, 1, 23) == "person08123-30+45"
    assert file_stem(1, 1, 57) == "person01157+15-30"
    assert file_stem(1, 1, 46, prefix="personne") == "personne01146+0+0"
    assert (file_stem(1, 2, 0), file_stem(1, 2, 92)) == ("person01200-90+0", "person01292+90+0")
    assert len(set(POSE_GRID)) == 93


def test_the_real_layout_converts_person_images_only(archive, tmp_path, caplog):
    caplog.set_level("INFO", logger=prima.__name__)
    manifest = prima.convert_archive(archive, tmp_path, FEW_CROPS)
    assert manifest["source_images"] == {"train": 186, "eval": 186}
    assert manifest["persons"] == {"train": [1], "eval": [5]}
    assert manifest["skipped"] == {"Front/": 8, "other": 5}
    assert manifest["skipped_examples"] == {
        "Front/": ["Front/personne01146+0+0.jpg", "Front/personne01146+0+0.txt",
                   "Front/personne01246+0+0.jpg"],
        "other": ["README", ".DS_Store", "Person01/.DS_Store"]}
    assert manifest["clipped_boxes"] == 12
    assert manifest["splits"]["train"]["count"] == 2 * 186
    assert manifest["splits"]["eval"]["count"] == 186
    # Every pose of the grid, from both series: 2 crops each in train, 1 in eval.
    assert _poses(tmp_path, "train") == {pose: 4 for pose in POSE_GRID}
    assert _poses(tmp_path, "eval") == {pose: 2 for pose in POSE_GRID}
    assert any("skipped 13 members" in r.message and "12 face boxes" in r.message
               for r in caplog.records)


@pytest.mark.parametrize("name, kind", [
    ("Person01/person01100-90+0.jpg", "image"),
    ("Person15/person15292+90+0.txt", "image"),
    ("HeadPoseImageDatabase/Person01/person01100-90+0.jpg", "image"),  # inside a wrapping folder
    ("Person02/person0214+15-30.jpg", "image"),  # looks like an image: parsed, and refused
    ("Front/personne01146+0+0.jpg", "Front/"),
    ("Front/personne01146+0+0.txt", "Front/"),
    ("Front/notes", "Front/"),
    ("HeadPoseImageDatabase/Front/personne01146+0+0.jpg", "Front/"),
    ("Front", "other"),  # a file, not the folder
    ("Person01/personne01146+0+0.jpg", "other"),
    ("Person01/.DS_Store", "other"),
    ("Person01/._person01100-90+0.jpg", "other"),
    ("Person01/person01100-90+0.jpg.bak", "other"),
    ("person01100-90+0.jpg", "other"),  # no Person folder
    ("README", "other"),
    ("Scripts/Person01/notes.txt", "other"),
])
def test_only_person_folder_images_are_read(name, kind):
    assert prima_archive.member_kind(name) == kind


def test_lf_and_crlf_annotations_give_the_same_box():
    box = prima_archive.FaceBox(186, 161, 96, 131)
    for crlf in (False, True):
        text = annotation("person01100-90+0.jpg", (186, 161, 96, 131), crlf=crlf)
        assert (b"\r\n" in text) == crlf
        assert prima_archive.parse_face_box(text, "Person01/person01100-90+0.txt") == box


def _refusal(members, tmp_path) -> prima_archive.PrimaFormatError:
    out = tmp_path / "out"
    with pytest.raises(prima_archive.PrimaFormatError) as caught:
        prima.convert_archive(write_archive(tmp_path / "bad.tar.gz", members), out, FEW_CROPS)
    assert not [p for p in out.iterdir()], "a refused archive must leave the output folder empty"
    return caught.value


def test_an_archive_of_front_images_and_strays_only_is_refused(members, tmp_path):
    error = _refusal([m for m in members if not m[0].startswith("Person")], tmp_path)
    assert "no usable Person images" in str(error)
    assert "Front/personne01146+0+0.jpg" in str(error) and "README" in str(error)


def test_images_outside_their_person_folder_are_not_usable(members, tmp_path):
    flat = [(name.rpartition("/")[2], data) for name, data in members if name.startswith("Person")]
    error = _refusal(flat, tmp_path)
    assert "no usable Person images" in str(error) and "'other': 746" in str(error)  # 2 x 372 + 2 strays


def test_a_jpg_without_its_txt_is_refused(members, tmp_path):
    error = _refusal(_replaced(members, "Person01/person01157+15-30.txt", None), tmp_path)
    assert error.member == "Person01/person01157+15-30.jpg"
    assert "has no .txt annotation beside it" in str(error)


@pytest.mark.parametrize("numbers, reason", [
    (("186", "abc", "96", "131"), "centre x, y, width, height"),
    (("186", "161", "96"), "centre x, y, width, height"),
    (("186", "161", "96.5", "131"), "centre x, y, width, height"),
    (("186", "161", "0", "131"), "no area"),
    (("186", "161", "96", "-131"), "no area"),
], ids=["not-a-number", "three-numbers", "fraction", "zero-width", "negative-height"])
def test_a_txt_whose_numbers_are_not_a_box_is_refused(members, tmp_path, numbers, reason):
    name = f"Person05/{file_stem(5, 2, 4)}.txt"
    assert name == "Person05/person05204-60-45.txt"
    text = "\n".join([Path(name).stem + ".jpg", "", "Face", *numbers]).encode()
    error = _refusal(_replaced(members, name, text), tmp_path)
    assert error.member == name and reason in str(error)


def test_a_box_wholly_outside_the_image_is_refused(members, tmp_path):
    name = "Person01/person01140+0-90.txt"
    error = _refusal(_replaced(members, name, annotation(name, (600, 400, 96, 120))), tmp_path)
    assert error.member == "Person01/person01140+0-90.jpg" and "outside the 384x288 image" in str(error)


PREFIX = "s3://raw/headpose/datasets/prima-test/"


def _staging_settings() -> dict:
    from headpose.datasets import settings as dataset_settings

    return dataset_settings.prima_settings({
        "prima_archive_uri": "s3://raw/prima/HeadPoseImageDatabase.tar.gz",
        "prima_num_data_aug": 2, "prima_num_eval_aug": 1, "seed": 0, "images_per_shard": 150,
    })


def test_links_are_refused_as_images_and_never_followed_elsewhere(members, tmp_path):
    image = "Person01/person01157+15-30.jpg"
    error = _refusal([link(image, "/etc/passwd") if name == image else (name, data)
                      for name, data in members], tmp_path)
    assert error.member == image and "not a regular file" in str(error)
    strays = [link("Front/personne99146+0+0.jpg", "/etc/passwd"), link("README.lnk", "README", hard=True)]
    manifest = prima.convert_archive(write_archive(tmp_path / "links.tar.gz", members + strays),
                                     tmp_path / "ok", FEW_CROPS)
    assert manifest["skipped"] == {"Front/": 9, "other": 6}


@pytest.mark.parametrize("name, size, limit", [
    ("Person05/person05246+0+0.txt", 4 * 1024 + 1, 4 * 1024),
    ("Person05/person05246+0+0.jpg", 8 * 1024**2 + 1, 8 * 1024**2),
])
def test_oversized_members_are_refused_before_they_are_read(members, tmp_path, name, size, limit):
    error = _refusal(_replaced(members, name, b"1" * size), tmp_path)
    assert error.member == name and f"{size} bytes, more than the {limit} allowed" in str(error)


def test_a_second_copy_of_an_image_is_refused(members, tmp_path):
    name = "Person01/person01100-90+0.jpg"
    error = _refusal(members + [(name, dict(members)[name])], tmp_path)
    assert error.member == name and "a second file for an image already read" in str(error)


def _stage(s3_client, archive: Path, tmp_path: Path, logs: list[str]) -> dict:
    from headpose.datasets import staging

    s3_client.create_bucket(Bucket="raw")
    s3_client.upload_file(str(archive), "raw", "prima/HeadPoseImageDatabase.tar.gz")
    return staging.stage_prima_dataset(s3_client, PREFIX, _staging_settings(), logs.append,
                                       scratch_root=tmp_path)


def _staged_manifest(s3_client) -> dict:
    body = s3_client.get_object(Bucket="raw", Key=PREFIX[len("s3://raw/"):] + "manifest.json")["Body"]
    return json.loads(body.read())


def test_stage_dataset_converts_from_s3_once_and_then_skips(archive, s3_client, tmp_path):
    from headpose.datasets import staging

    logs: list[str] = []
    first = _stage(s3_client, archive, tmp_path, logs)
    assert first["staged"] is True and first["source"] == "prima"
    assert (first["train_count"], first["eval_count"]) == (372, 186)
    staged = _staged_manifest(s3_client)
    assert staged["channel_order"] == "bgr" and staged["settings"]["channel_order"] == "bgr"
    assert staged["skipped"] == {"Front/": 8, "other": 5} and staged["clipped_boxes"] == 12
    checked = staging.check_dataset_prefix(s3_client, PREFIX, print)
    assert (checked["train_count"], checked["train_shards"]) == (372, 3)

    again = staging.stage_prima_dataset(s3_client, PREFIX, _staging_settings(), logs.append,
                                        scratch_root=tmp_path)
    assert again["staged"] is False
    assert any("skipping conversion" in line for line in logs)


@pytest.mark.slow
def test_staged_real_layout_shards_train_with_the_entry_point(archive, s3_client, tmp_path):

    staged = _stage(s3_client, archive, tmp_path, [])
    channel = tmp_path / "training"
    for split in ("train", "eval"):
        store.download_split(s3_client, PREFIX, split, channel)
    model_dir, output = tmp_path / "model", tmp_path / "output"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include"), "SM_CHANNEL_TRAINING": str(channel),
           "SM_MODEL_DIR": str(model_dir), "SM_OUTPUT_DIR": str(output),
           "SM_OUTPUT_DATA_DIR": str(output / "data")}
    model_dir.mkdir()
    process = subprocess.run(
        [sys.executable, "-m", "headpose.training.entry", "--training_steps", "20",
         "--batch_size", "16", "--resnet_size", "10", "--base_filters", "8",
         "--evaluation_steps", "4", "--log_every", "10"],
        env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["train_images"] == staged["train_count"] == 372
    assert metrics["training_steps"] == 20 and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert (model_dir / metrics["export_dir"] / "saved_model.pb").is_file()
    assert "progress: step=20/20" in process.stdout and not (output / "failure").exists()


def test_stage_dataset_names_a_missing_archive(s3_client, tmp_path):
    from headpose.datasets import staging

    s3_client.create_bucket(Bucket="raw")
    settings = {"archive_uri": "s3://raw/nothing.tar.gz", "num_data_aug": 1, "num_eval_aug": 1,
                "seed": 0, "images_per_shard": 10}
    with pytest.raises(store.DatasetError, match="s3://raw/nothing.tar.gz does not exist"):
        staging.stage_prima_dataset(s3_client, "s3://raw/ds/", settings, print, scratch_root=tmp_path)


def test_a_prima_run_needs_the_archive_and_names_its_prefix_by_it():
    from headpose.planning.rules import RunParamsError, validate_run_params
    from headpose.planning.plan import dataset_plan

    with pytest.raises(RunParamsError, match="dataset_source=prima needs prima_archive_uri"):
        validate_run_params({"s3_bucket": "models", "dataset_source": "prima"})
    base = {"s3_bucket": "models", "dataset_source": "prima",
            "prima_archive_uri": "s3://raw/HeadPoseImageDatabase.tar.gz"}
    prefix, settings = dataset_plan(validate_run_params(base))
    assert prefix.startswith("s3://models/headpose/datasets/prima-") and prefix.endswith("/")
    assert settings["archive_uri"] == base["prima_archive_uri"] and settings["num_data_aug"] == 15
    assert settings["channel_order"] == "bgr"
    other, _ = dataset_plan(validate_run_params({**base, "prima_archive_uri": "s3://raw/v2.tar.gz"}))
    assert other != prefix
