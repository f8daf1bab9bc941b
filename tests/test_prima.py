"""The Prima converter on a small archive built here in the database's exact layout.

Every fabricated image has a distinct pose, so a record's labels say which image (and so
which person) it came from. The face box is drawn as a white rectangle with a coloured
band along each side (top red, bottom green, left blue, right yellow): a crop holds the
whole box exactly when all four colours show in it.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from headpose.datasets import prima, prima_archive, prima_crops
from headpose.training import labels
from prima_archive_support import tar_bytes, write_archive

ROOT = Path(__file__).resolve().parents[1]
PERSONS = (1, 2, 5, 10, 15)
EVAL_PERSONS = {5, 10, 15}
WIDTH, HEIGHT = 384, 288
BAND = 6
EDGE_COLOURS = {"top": (255, 0, 0), "bottom": (0, 255, 0), "left": (0, 0, 255),
                "right": (255, 255, 0)}

# 20 distinct poses of the Prima grid: tilt +-90 only with pan 0, tilt +-15 and pan +-75.
POSES = [(-90, 0), (90, 0), (15, -30), (-15, 75), (0, 0), (60, -90), (-60, 45), (30, 15),
         (-30, -60), (0, 90), (15, 15), (-15, -15), (60, 60), (-60, -75), (30, -45),
         (-30, 30), (0, -90), (15, 90), (-15, 0), (60, 0)]


def _images():
    """(person, series, index, tilt, pan, face box) of every fabricated image."""
    result, pose = [], iter(POSES)
    for p_number, person in enumerate(PERSONS):
        for series in (1, 2):
            for index in (0, 1):
                tilt, pan = next(pose)
                k = len(result)
                box = prima_archive.FaceBox(130 + 9 * k, 110 + 4 * k, 60 + 2 * (k % 5) * 2, 80 + 2 * (k % 3) * 2)
                result.append((person, series, index, tilt, pan, box))
    return result


def _stem(person, series, index, tilt, pan) -> str:
    return f"Person{person:02d}/person{person:02d}{series}{index:02d}{tilt:+d}{pan:+d}"


def _draw(box: prima_archive.FaceBox, person: int) -> bytes:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = (20 + 10 * person, 40, 60)
    top, bottom, left, right = box.top, box.bottom, box.left, box.right
    image[top:bottom + 1, left:right + 1] = 255
    image[top:bottom + 1, left:left + BAND] = EDGE_COLOURS["left"]
    image[top:bottom + 1, right + 1 - BAND:right + 1] = EDGE_COLOURS["right"]
    image[top:top + BAND, left:right + 1] = EDGE_COLOURS["top"]
    image[bottom + 1 - BAND:bottom + 1, left:right + 1] = EDGE_COLOURS["bottom"]
    return tf.io.encode_jpeg(image, quality=95, chroma_downsampling=False).numpy()


def _annotation(name: str, box: prima_archive.FaceBox) -> bytes:
    lines = [name, "", "Face", box.centre_x, box.centre_y, box.width, box.height]
    return ("\r\n".join(str(v) for v in lines) + "\r\n").encode()


def _members() -> list[tuple[str, bytes]]:
    members = []
    for person, series, index, tilt, pan, box in _images():
        stem = _stem(person, series, index, tilt, pan)
        members.append((stem + ".jpg", _draw(box, person)))
        members.append((stem + ".txt", _annotation(Path(stem).name + ".jpg", box)))
    return members


def _records(directory: Path, split: str) -> list[tf.train.Example]:
    files = [str(p) for p in sorted(directory.glob(f"{split}-*.tfrecord"))]
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files)]


def _decoded(example: tf.train.Example):
    f = example.features.feature
    height, width = f["height"].int64_list.value[0], f["width"].int64_list.value[0]
    image = np.frombuffer(f["image"].bytes_list.value[0], np.uint8).reshape(height, width, 3)
    return image, round(f["tilt"].float_list.value[0] * 90), round(f["pan"].float_list.value[0] * 90)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_archive(tmp_path_factory.mktemp("prima") / "HeadPoseImageDatabase.tar.gz", _members())


@pytest.fixture(scope="module")
def converted(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = prima.convert_archive(archive, out)
    return out, manifest


# --- names, annotations, crop sampling ------------------------------------------------

def test_member_names_follow_the_database():
    assert prima_archive.parse_member_name("Person01/person01100-90+0.jpg") == (
        prima_archive.ImageKey(person=1, series=1, index=0, tilt=-90, pan=0), "jpg")
    assert prima_archive.parse_member_name("Person15/person15292+15-30.txt") == (
        prima_archive.ImageKey(person=15, series=2, index=92, tilt=15, pan=-30), "txt")
    assert prima_archive.parse_member_name("Person07/person07145+0-75.jpg")[0].pan == -75


@pytest.mark.parametrize("name", [
    "Person01/person01100-90.jpg",  # no pan
    "Person02/person01100-90+0.jpg",  # wrong folder
    "person01100-90+0.jpg",  # no folder
    "Person01/person01193+0+0.jpg",  # index 93
    "Person01/person01300+0+0.jpg",  # series 3
    "Person01/person01100+45+0.jpg",  # 45 is not a tilt
    "Person01/person01100+0+0.png",
    "Person01/README",
])
def test_unparseable_names_are_refused_by_name(name):
    with pytest.raises(prima_archive.PrimaFormatError, match="not a Prima|folder|index|pose") as caught:
        prima_archive.parse_member_name(name)
    assert caught.value.member == name and name in str(caught.value)


def test_annotation_is_three_header_lines_then_the_box():
    text = b"person01100-90+0.jpg\n\nFace\n186\n161\n96\n131\n"
    assert prima_archive.parse_face_box(text, "m") == prima_archive.FaceBox(186, 161, 96, 131)
    with pytest.raises(prima_archive.PrimaFormatError, match="Person01/x.txt"):
        prima_archive.parse_face_box(b"person01100-90+0.jpg\n\nFace\n186\n161\n", "Person01/x.txt")
    with pytest.raises(prima_archive.PrimaFormatError, match="header"):
        prima_archive.parse_face_box(b"a\n\nFace\n186\nabc\n96\n131\n", "m")


@pytest.mark.parametrize("size", [(84, 84), (96, 54)])
def test_every_sampled_crop_contains_the_face_box(size):
    out_width, out_height = size
    rng = np.random.default_rng(1)
    for _ in range(200):
        width, height = int(rng.integers(20, 150)), int(rng.integers(20, 150))
        box = prima_archive.FaceBox(int(rng.integers(width // 2 + 1, WIDTH - width // 2 - 2)),
                            int(rng.integers(height // 2 + 1, HEIGHT - height // 2 - 2)),
                            width, height)
        for x, y, w, h in prima_crops.crop_windows(rng, HEIGHT, WIDTH, box, 5, out_width, out_height):
            assert 0 <= x <= box.left and x + w - 1 >= box.right and x + w <= WIDTH
            assert 0 <= y <= box.top and y + h - 1 >= box.bottom and y + h <= HEIGHT
            assert w * out_height == h * out_width


def test_a_box_that_admits_no_crop_is_an_error_not_a_hang():
    box = prima_archive.FaceBox(192, 144, 380, 284)  # the face fills the frame
    with pytest.raises(prima_archive.PrimaFormatError, match="Person01/x.jpg.*no 96:54 crop"):
        prima_crops.crop_windows(np.random.default_rng(0), HEIGHT, WIDTH, box, 1, 96, 54, "Person01/x.jpg")


# --- conversion -------------------------------------------------------------------------

def test_counts_per_split_follow_the_augmentation_factors(converted):
    out, manifest = converted
    n_train = sum(1 for i in _images() if i[0] not in EVAL_PERSONS)
    n_eval = len(_images()) - n_train
    assert manifest["source_images"] == {"train": n_train, "eval": n_eval}
    assert manifest["splits"]["train"]["count"] == 15 * n_train == len(_records(out, "train"))
    assert manifest["splits"]["eval"]["count"] == 3 * n_eval == len(_records(out, "eval"))
    assert manifest["persons"] == {"train": [1, 2], "eval": [5, 10, 15]}
    for split in ("train", "eval"):
        assert sum(manifest["splits"][split]["per_class"]) == manifest["splits"][split]["count"]


def test_labels_match_file_names_and_held_out_persons_are_only_in_eval(converted):
    out, _ = converted
    expected = {"train": Counter(), "eval": Counter()}
    for person, _s, _i, tilt, pan, _box in _images():
        split = "eval" if person in EVAL_PERSONS else "train"
        expected[split][(tilt, pan)] += 3 if split == "eval" else 15
    for split in ("train", "eval"):
        found = Counter(_decoded(e)[1:] for e in _records(out, split))
        assert found == expected[split]


def test_class_counts_follow_the_tutorial_bins(converted):
    _, manifest = converted
    expected = [0] * labels.NUM_CLASSES
    for person, _s, _i, tilt, pan, _box in _images():
        if person not in EVAL_PERSONS:
            expected[labels.class_index(tilt / 90, pan / 90)] += 15
    assert manifest["splits"]["train"]["per_class"] == expected


def test_every_crop_holds_the_whole_face_box_in_bgr(converted):
    out, _ = converted
    for split in ("train", "eval"):
        for example in _records(out, split):
            image, tilt, pan = _decoded(example)
            assert image.shape == (84, 84, 3)
            pixels = image.reshape(-1, 3).astype(int)
            for side, colour in EDGE_COLOURS.items():
                # Red must be found in channel 2: by default the pixels are the tutorial's BGR.
                near = np.abs(pixels - colour[::-1]).max(axis=1) < 60
                assert near.any(), f"{split} crop of pose {(tilt, pan)} lacks the {side} edge"


def test_rgb_shards_are_the_bgr_shards_with_channels_reversed(converted, archive, tmp_path):
    out, bgr_manifest = converted
    manifest = prima.convert_archive(archive, tmp_path, {"channel_order": "rgb"})
    assert (bgr_manifest["channel_order"], bgr_manifest["image"]["channels"]) == ("bgr", "BGR")
    assert (manifest["channel_order"], manifest["image"]["channels"]) == ("rgb", "RGB")
    assert manifest["settings"]["channel_order"] == "rgb"
    for split in ("train", "eval"):
        rgb, bgr = _records(tmp_path, split), _records(out, split)
        assert len(rgb) == len(bgr) == manifest["splits"][split]["count"]
        for rgb_record, bgr_record in zip(rgb, bgr):
            (rgb_image, *rgb_pose), (bgr_image, *bgr_pose) = _decoded(rgb_record), _decoded(bgr_record)
            assert rgb_pose == bgr_pose
            np.testing.assert_array_equal(rgb_image, bgr_image[..., ::-1])
    first, _, _ = _decoded(_records(tmp_path, "train")[0])
    assert (np.abs(first.reshape(-1, 3).astype(int) - EDGE_COLOURS["top"]).max(axis=1) < 60).any()


def test_manifest_records_source_settings_and_checksums(converted, archive):
    out, manifest = converted
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["source"] == "prima"
    assert manifest["source_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert manifest["settings"] == {
        "num_data_aug": 15, "num_eval_aug": 3, "size": "84x84", "seed": 0,
        "images_per_shard": 1000, "eval_persons": [5, 10, 15], "channel_order": "bgr",
        "converter_version": prima.CONVERTER_VERSION}
    assert manifest["channel_order"] == "bgr" and manifest["image"]["channels"] == "BGR"
    assert manifest["skipped"] == {"Front/": 0, "other": 0} and manifest["clipped_boxes"] == 0
    for split in ("train", "eval"):
        for shard in manifest["splits"][split]["shards"]:
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch left


def test_two_runs_write_identical_shards(converted, archive, tmp_path):
    _, first = converted
    second = prima.convert_archive(archive, tmp_path)
    assert second["splits"] == first["splits"]
    other_seed = prima.convert_archive(archive, tmp_path / "seed1", {"seed": 1})
    assert other_seed["splits"]["train"]["shards"] != first["splits"]["train"]["shards"]


def test_member_order_does_not_change_the_crops(converted, tmp_path):
    out, _ = converted
    members = _members()
    random.Random(3).shuffle(members)  # pairs split apart, .txt before .jpg at times
    shuffled = write_archive(tmp_path / "shuffled.tar.gz", members)
    prima.convert_archive(shuffled, tmp_path / "out")
    for split in ("train", "eval"):
        serialised = lambda d: sorted(e.SerializeToString() for e in _records(d, split))  # noqa: E731
        assert serialised(tmp_path / "out") == serialised(out)


def test_sixteen_by_nine_option_writes_96x54(archive, tmp_path):
    manifest = prima.convert_archive(archive, tmp_path, {"size": "96x54", "num_data_aug": 2,
                                                         "num_eval_aug": 1, "images_per_shard": 7})
    assert manifest["image"]["height"] == 54 and manifest["image"]["width"] == 96
    images = [_decoded(e)[0] for e in _records(tmp_path, "train")]
    assert len(images) == 16 and all(i.shape == (54, 96, 3) for i in images)
    assert len(manifest["splits"]["train"]["shards"]) == 3


# --- hostile and broken archives ---------------------------------------------------------

def test_truncated_archive_is_an_error_naming_a_member(archive, tmp_path):
    data = archive.read_bytes()
    names = {name for name, _ in _members()}
    for cut in (len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 5):
        broken = tmp_path / f"cut{cut}.tar.gz"
        broken.write_bytes(data[:cut])
        with pytest.raises(prima_archive.PrimaFormatError, match="truncated") as caught:
            prima.convert_archive(broken, tmp_path / f"out{cut}")
        assert caught.value.member in names and caught.value.member in str(caught.value)
        assert not list((tmp_path / f"out{cut}").glob("*.tfrecord"))


def test_tar_cut_at_a_member_boundary_inside_valid_gzip_is_caught(tmp_path):
    members = _members()
    whole = tar_bytes(members[:4], directories=False)
    # Two members of (512-byte header + data padded to 512) each.
    boundary = sum(512 + -(-len(data) // 512) * 512 for _, data in members[:2])
    broken = tmp_path / "cut.tar.gz"
    broken.write_bytes(gzip.compress(whole[:boundary]))
    with pytest.raises(prima_archive.PrimaFormatError, match="end-of-archive") as caught:
        list(prima_archive.iter_image_pairs(open(broken, "rb")))
    assert caught.value.member == members[1][0]


def test_unparseable_member_name_stops_the_conversion(tmp_path):
    bad = "Person02/person0214+15-30.jpg"  # index of one digit
    members = _members()
    members.insert(5, (bad, members[0][1]))
    with pytest.raises(prima_archive.PrimaFormatError) as caught:
        prima.convert_archive(write_archive(tmp_path / "bad.tar.gz", members), tmp_path / "out")
    assert caught.value.member == bad and bad in str(caught.value)
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("drop, missing", [(".txt", "annotation"), (".jpg", "image")])
def test_an_image_without_its_partner_is_named(tmp_path, drop, missing):
    members = _members()
    orphan = next(name for name, _ in members if name.endswith(drop))
    kept = orphan[: -len(drop)] + (".jpg" if drop == ".txt" else ".txt")
    members = [m for m in members if m[0] != orphan]
    with pytest.raises(prima_archive.PrimaFormatError, match=missing) as caught:
        prima.convert_archive(write_archive(tmp_path / "o.tar.gz", members), tmp_path / "out")
    assert caught.value.member == kept


def test_pairs_further_apart_than_the_buffer_allows_are_refused(tmp_path):
    members = sorted(_members(), key=lambda m: m[0].endswith(".txt"))  # every .jpg first
    archive = write_archive(tmp_path / "far.tar.gz", members)
    with pytest.raises(prima_archive.PrimaFormatError, match="too far apart"):
        prima.convert_archive(archive, tmp_path / "out", max_pending_bytes=30_000)
    assert prima.convert_archive(archive, tmp_path / "ok")["source_images"]["eval"] == 12


def test_non_jpeg_image_is_named(tmp_path):
    members = _members()
    name, _ = members[2]
    members[2] = (name, b"not a jpeg")
    with pytest.raises(prima_archive.PrimaFormatError, match="JPEG") as caught:
        prima.convert_archive(write_archive(tmp_path / "j.tar.gz", members), tmp_path / "out")
    assert caught.value.member == name


# --- staging and the CLI -------------------------------------------------------------------

def test_manifest_matches_same_source_and_settings_only(converted):
    _, manifest = converted
    sha = manifest["source_sha256"]
    assert prima.manifest_matches(manifest, sha, {})
    assert prima.manifest_matches(manifest, sha, prima.PrimaSettings())
    assert not prima.manifest_matches(manifest, "0" * 64, {})
    assert not prima.manifest_matches(manifest, sha, {"num_data_aug": 14})
    assert not prima.manifest_matches({**manifest, "source": "synthetic"}, sha, {})
    assert not prima.manifest_matches(None, sha, {})
    stale = {**manifest, "settings": {**manifest["settings"], "converter_version": 0}}
    assert not prima.manifest_matches(stale, sha, {})


def test_stage_prima_skips_a_dataset_already_staged(archive, tmp_path, monkeypatch):
    first = prima.stage_prima(archive, tmp_path, num_data_aug=2, num_eval_aug=1)
    convert = prima.convert_archive
    monkeypatch.setattr(prima, "convert_archive", lambda *a, **k: pytest.fail("converted again"))
    assert prima.stage_prima(archive, tmp_path, num_data_aug=2, num_eval_aug=1) == first

    # Other settings, or a damaged shard, make it convert again (and replace the old shards).
    monkeypatch.setattr(prima, "convert_archive", convert)
    second = prima.stage_prima(archive, tmp_path, num_data_aug=3, num_eval_aug=1)
    assert second["splits"]["train"]["count"] == 3 * 8
    assert sorted(p.name for p in tmp_path.glob("*.tfrecord")) == ["eval-00000.tfrecord",
                                                                   "train-00000.tfrecord"]
    (tmp_path / "train-00000.tfrecord").write_bytes(b"damaged")
    third = prima.stage_prima(archive, tmp_path, num_data_aug=3, num_eval_aug=1)
    assert third["splits"] == second["splits"]


def test_cli_help_describes_every_argument():
    result = subprocess.run(
        [sys.executable, "-m", "headpose.datasets.prima", "--help"], capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT / "include"), "PATH": "/usr/bin:/bin"}, check=True)
    for option in ("--archive", "--out", "--num-data-aug", "--num-eval-aug", "--size", "--seed",
                   "--images-per-shard", "--eval-persons", "--max-pending-mib"):
        assert option in result.stdout
    assert "96x54" in result.stdout and "--channel-order {bgr,rgb}" in result.stdout


def test_cli_converts_and_reports_errors(archive, tmp_path, capsys):
    assert prima.main(["--archive", str(archive), "--out", str(tmp_path / "o"),
                       "--num-data-aug", "1", "--num-eval-aug", "1", "--seed", "4",
                       "--channel-order", "rgb"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"train": 8, "eval": 12}
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["channel_order"] == "rgb"
    assert prima.main(["--archive", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path)]) == 1
    assert "missing.tar.gz" in capsys.readouterr().err
