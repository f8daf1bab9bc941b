"""The edge client against a published pointer in moto's S3 (and a local one): predict, verify, follow."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from headpose.edge.client import Follower, default_fetch, load_model, read_local, read_record
from headpose.edge.errors import EdgeClientError
from headpose.edge.labels import DEEPLENS_LABELS
from headpose.planning.layout import split_s3_uri
from support import ROOT, aws_env

pytestmark = pytest.mark.slow
BUCKET = "edge-client"
POINTER = f"s3://{BUCKET}/headpose/published/latest.json"
JOB_A = "deeplens-TF-headpose-2025-02-01-03-00-00-000"
JOB_B = "deeplens-TF-headpose-2025-02-02-03-00-00-000"


@pytest.fixture(scope="module")
def models(tiny_edge_models, tmp_path_factory):
    from headpose.artifacts.edge.export import export_edge_models

    other = tiny_edge_models["other"]  # the untrained model's ONNX file: the "next" published model
    folder = tmp_path_factory.mktemp("other-edge")
    other_edge = export_edge_models(other.pb_path, other.metadata, folder, None, ("onnx",)).manifest
    return {**tiny_edge_models, "other_edge": other_edge, "other_edge_dir": folder}


@pytest.fixture(scope="module")
def verdicts(models):
    from headpose.artifacts.edge.validate import validate_edge_models

    return validate_edge_models(models["manifest"], models["edge_dir"], models["frozen"], models["train"])


def _publish(s3, job: str, manifest: dict, folder, verdicts: dict) -> dict:
    """Upload a model's edge files under a run-scoped prefix and return its version 3 record."""
    from headpose.artifacts.edge.export import pointer_formats

    prefix = f"s3://{BUCKET}/headpose/TFartifacts/{job}/output/edge/"
    exported = {}
    for name, entry in manifest["formats"].items():
        for file in entry["files"]:
            s3.upload_file(str(folder / file), *split_s3_uri(prefix + file))
        exported[name] = {"runtime": entry["runtime"], "precision": entry["precision"], "metadata": entry["metadata"],
                          "files": {f: {"uri": prefix + f, "sha256": r["sha256"]} for f, r in entry["files"].items()}}
    graph = {"uri": prefix + "frozen_model.pb", "sha256": manifest["frozen_model"]["sha256"]}
    return {"version": 3, "training_job_name": job, "published_at": "2025-02-01T03:30:00+00:00",
            "attempts": [job], "files": {"frozen_model.pb": graph},
            "formats": pointer_formats(exported, verdicts),
            "channel_order": next(iter(exported.values()))["metadata"]["preprocessing"]["channel_order"]}


def _point(s3, record: dict | bytes) -> None:
    body = record if isinstance(record, bytes) else json.dumps(record).encode()
    s3.put_object(Bucket=BUCKET, Key=split_s3_uri(POINTER)[1], Body=body)


@pytest.fixture()
def published(s3_client, s3_endpoint, monkeypatch, models, verdicts) -> dict:
    for name, value in aws_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    s3_client.create_bucket(Bucket=BUCKET)
    record = _publish(s3_client, JOB_A, models["manifest"], models["edge_dir"], verdicts)
    _point(s3_client, record)
    return {"s3": s3_client, "endpoint": s3_endpoint, "record": record}


def _training_pictures(count: int) -> list[np.ndarray]:
    """The first training images, rendered again: ``render_round``'s first draws of seed 0."""
    from headpose.datasets.rendering import generate_image
    from headpose.datasets.synthetic import prima_poses

    rng = np.random.default_rng(np.random.SeedSequence([0, 0, 0]))
    return [generate_image(rng, tilt, pan) for tilt, pan in prima_poses()[:count]]


def _save(pictures, folder) -> list:
    from PIL import Image

    paths = []
    for number, picture in enumerate(pictures):
        paths.append(folder / f"head{number}.png")
        Image.fromarray(picture).save(paths[-1])
    return paths


def _frozen_classes(models, pictures) -> list[int]:
    from headpose.artifacts.evaluate import load_frozen_graph

    batch = np.stack(pictures).astype(np.float32) / 255.0  # the shards' scale; the pictures are RGB
    if models["metadata"]["preprocessing"]["channel_order"] == "bgr":
        batch = batch[..., ::-1]  # the order the model was trained in, which the client must match
    return load_frozen_graph(models["frozen"])(batch).argmax(axis=1).tolist()


CHILD = """
import atexit, json, runpy, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(m for m in sys.modules
                                if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx"))), file=sys.stderr))
sys.argv = ["headpose.edge", *sys.argv[1:]]
runpy.run_module("headpose.edge", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("format_name", ["onnx", "litert_int8", "openvino_fp32", "openvino_int8", "onnx_int8"])
def test_predict_runs_without_tensorflow_and_agrees_with_the_frozen_graph(published, models, tmp_path, format_name):
    pictures = _training_pictures(3)
    rng = np.random.default_rng(5)
    unseen = [_random_head(rng)] if "int8" not in format_name else []  # int8 agrees where it is sure
    big = np.repeat(np.repeat(pictures[0], 2, axis=0), 2, axis=1)  # 168x168: resized back exactly
    paths = _save([*pictures, *unseen, big], tmp_path)
    env = {**os.environ, **aws_env(published["endpoint"]), "PYTHONPATH": str(ROOT / "include")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "predict", *map(str, paths), "--pointer", POINTER, "--format", format_name,
         "--endpoint-url", published["endpoint"], "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stderr.split("MODULES ", 1)[1].splitlines()[0])
    assert modules == []
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    expected = _frozen_classes(models, [*pictures, *unseen, pictures[0]])
    assert [line["class"] for line in lines] == expected
    for line in lines:
        assert line["label"] == DEEPLENS_LABELS[line["class"]] and line["format"] == format_name
        assert list(line["probabilities"]) == list(DEEPLENS_LABELS)
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=0.02)
        assert line["training_job_name"] == JOB_A
    assert lines[-1]["probabilities"] == lines[0]["probabilities"]


def _random_head(rng) -> np.ndarray:
    from headpose.datasets.rendering import generate_image

    return generate_image(rng, 15, -30)


def test_files_are_downloaded_once_and_a_damaged_cache_is_refilled(published, models, tmp_path):
    fetched: list[str] = []
    fetch_s3 = default_fetch(published["endpoint"])

    def fetch(uri: str) -> bytes:
        fetched.append(uri.rsplit("/", 1)[-1])
        return fetch_s3(uri)

    record = read_record(fetch, POINTER)
    first = load_model(fetch, record, tmp_path, "openvino_fp32")
    assert fetched == ["latest.json", "model.bin", "model.xml"] or fetched == ["latest.json", "model.xml", "model.bin"]
    fetched.clear()
    load_model(fetch, record, tmp_path, "openvino_bf16")  # the same files, another precision hint
    assert fetched == []
    cached = tmp_path / record["formats"]["openvino_fp32"]["sha256"] / "model.bin"
    damaged = cached.with_name("damaged")
    damaged.write_bytes(b"damaged")
    damaged.replace(cached)  # a new file: the open model keeps the one it mapped
    again = load_model(fetch, record, tmp_path, "openvino_fp32")
    assert fetched == ["model.bin"]
    picture = _save(_training_pictures(1), tmp_path)[0]
    assert again.predict(picture) == first.predict(picture)


def test_a_tampered_file_in_s3_is_refused_with_one_line(published, tmp_path, capsys):
    from headpose.edge.__main__ import main

    entry = published["record"]["formats"]["litert_float32"]
    published["s3"].put_object(Bucket=BUCKET, Key=split_s3_uri(entry["uri"])[1], Body=b"TFL3 tampered")
    picture = _save(_training_pictures(1), tmp_path)[0]
    code = main(["predict", str(picture), "--pointer", POINTER, "--format", "litert_float32",
                 "--endpoint-url", published["endpoint"], "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("error: model.tflite of format litert_float32") and "the pointer says" in err
    assert not any((tmp_path / "cache").rglob("model.tflite"))


def test_follow_switches_only_to_a_verified_model(published, models, tmp_path):
    s3, fetch = published["s3"], default_fetch(published["endpoint"])
    follower = Follower(fetch, POINTER, tmp_path / "cache", "onnx")
    picture = _save(_training_pictures(1), tmp_path)[0]
    assert follower.poll().kind == "loaded"
    assert follower.poll().kind == "unchanged"
    before = follower.model.predict(picture)

    other = models["other_edge"]
    record_b = _publish(s3, JOB_B, other, models["other_edge_dir"],
                        {"onnx": {"accepted": True, "accuracy": 0.1, "max_abs_diff": 0.0, "latency_ms_b1": 1.0}})
    wrong = json.loads(json.dumps(record_b))
    wrong["formats"]["onnx"]["sha256"] = hashlib.sha256(b"something else").hexdigest()
    _point(s3, wrong)
    event = follower.poll()
    assert event.kind == "kept" and "has sha256" in event.detail and "the pointer says" in event.detail
    assert follower.model.training_job_name == JOB_A and follower.model.predict(picture) == before
    _point(s3, b"{not json")
    assert follower.poll().kind == "kept" and follower.model.training_job_name == JOB_A

    _point(s3, record_b)
    event = follower.poll()
    assert (event.kind, event.training_job_name, event.detail) == ("switched", JOB_B, f"from {JOB_A}")
    assert follower.model.predict(picture).probabilities != before.probabilities


def test_follow_on_the_command_line_prints_events_and_predictions(published, tmp_path, capsys):
    from headpose.edge.__main__ import main

    picture = _save(_training_pictures(1), tmp_path)[0]
    code = main(["follow", str(picture), "--pointer", POINTER, "--format", "onnx", "--interval", "0",
                 "--max-polls", "2", "--endpoint-url", published["endpoint"], "--cache", str(tmp_path / "c")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert [line.get("event") for line in lines] == ["loaded", None, "unchanged"]
    assert lines[1]["image"] == str(picture) and lines[1]["training_job_name"] == JOB_A


def test_missing_format_unreadable_image_and_no_pointer_are_one_line_errors(published, tmp_path, capsys):
    from headpose.edge.__main__ import main

    picture = _save(_training_pictures(1), tmp_path)[0]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not a picture")
    common = ["--pointer", POINTER, "--endpoint-url", published["endpoint"], "--cache", str(tmp_path / "c")]
    cases = [
        (["predict", str(picture), "--format", "tensorrt", *common],
         f"error: format 'tensorrt' is not published for {JOB_A}; published: litert_float32, litert_int8, onnx, "
         "onnx_int8, openvino_bf16, openvino_fp16, openvino_fp32, openvino_int8"),
        (["predict", str(not_an_image), "--format", "onnx", *common], f"error: cannot read image {not_an_image}: "),
        (["predict", str(tmp_path / "missing.jpg"), "--format", "onnx", *common], "error: cannot read image "),
        (["predict", str(picture), "--pointer", f"s3://{BUCKET}/headpose/published/none.json",
          "--endpoint-url", published["endpoint"]], f"error: cannot read s3://{BUCKET}/headpose/published/none.json"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err


def test_a_local_pointer_is_read_and_checked_like_a_published_one(published, tmp_path):
    record = published["record"]
    path = tmp_path / "latest.json"
    path.write_text(json.dumps(record))
    fetch = default_fetch(published["endpoint"])  # the record's files are still in S3
    assert load_model(fetch, read_record(read_local, str(path)), tmp_path / "c", "onnx").format == "onnx"

    other = {"bgr": "rgb", "rgb": "bgr"}[record["channel_order"]]
    with pytest.raises(EdgeClientError, match=f"expects {record['channel_order'].upper()} images, the pointer says "
                       f"the model was trained on {other.upper()}"):
        load_model(fetch, {**record, "channel_order": other}, tmp_path / "c", "onnx")
    hostile = json.loads(json.dumps(record))
    hostile["formats"]["openvino_fp32"]["files"]["../../escape.bin"] = hostile["formats"]["openvino_fp32"]["files"].pop("model.bin")
    with pytest.raises(EdgeClientError, match="names a file '../../escape.bin' that is not a plain file name"):
        load_model(fetch, hostile, tmp_path / "c", "openvino_fp32")
    with pytest.raises(EdgeClientError, match="version 7 is not one of"):
        path.write_text(json.dumps({**record, "version": 7}))
        read_record(read_local, str(path))


def test_preprocessing_takes_order_range_and_size_from_the_metadata():
    import tensorflow as tf

    from headpose.edge.preprocess import model_input, preprocessing_of, resize_bilinear

    block = {"layout": "NHWC", "image_size": [84, 84], "channel_order": "bgr", "value_range": [-1.0, 1.0]}
    picture = np.zeros((84, 84, 3), np.uint8)
    picture[...] = (10, 20, 255)
    values = model_input(picture, preprocessing_of({"preprocessing": block}))
    assert values.shape == (1, 84, 84, 3) and values.dtype == np.float32
    np.testing.assert_allclose(values[0, 0, 0], [1.0, 20 / 127.5 - 1, 10 / 127.5 - 1], atol=1e-6)
    rgb = preprocessing_of({"preprocessing": {**block, "channel_order": None, "colour_order": "RGB",
                                              "image_size": [32, 48], "value_range": [0.0, 1.0]}})
    assert model_input(picture, rgb).shape == (1, 32, 48, 3)

    photo = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    expected = tf.raw_ops.ResizeBilinear(images=photo[None], size=[84, 84], half_pixel_centers=True).numpy()[0]
    np.testing.assert_array_equal(resize_bilinear(photo, 84, 84), np.clip(np.rint(expected), 0, 255))
    for bad, message in (({**block, "layout": "NCHW"}, "layout 'NCHW'"), ({**block, "resize": "area"}, "resize 'area'"),
                         ({**block, "value_range": [1, 0]}, "value_range")):
        with pytest.raises(EdgeClientError, match=message):
            preprocessing_of({"preprocessing": bad})


def test_int8_formats_that_miss_their_tolerance_are_withheld_and_the_others_published(published, models, tmp_path):
    """Calibrated on pixels scaled to [0, 1] twice (``p / 255 / 255``, a preprocessing bug), the
    int8 formats clip every real image to near black: they lose most images, are withheld
    with their figures, and the float32 format of the same model is published and runs."""
    from headpose.artifacts.edge.export import export_edge_models, representative_images
    from headpose.artifacts.edge.validate import validate_edge_models, validation_table

    scaled_twice = [image / 255.0 for image in representative_images(models["train"], 93)]
    folder = tmp_path / "edge"
    exported = export_edge_models(models["frozen"], models["metadata"], folder, scaled_twice,
                                  ("openvino_fp32", "openvino_int8", "onnx_int8", "litert_int8"))
    assert exported.refused == {}  # every file is a valid int8 model: only the evaluation tells
    verdicts = validate_edge_models(exported.manifest, folder, models["frozen"], models["train"])
    for name in ("openvino_int8", "onnx_int8", "litert_int8"):
        entry = verdicts[name]
        assert not entry["accepted"] and entry["reason"].startswith(f"{name}: ")
        assert entry["reference_correct"] - entry["correct"] > 2 and "images lost" in entry["reason"]
        assert entry["accuracy"] == entry["correct"] / entry["images"] and entry["latency_ms_b1"] > 0
    assert verdicts["openvino_fp32"]["accepted"]
    assert sum("withheld: " in line for line in validation_table(verdicts).splitlines()) == 3

    record = _publish(published["s3"], JOB_B, exported.manifest, folder, verdicts)
    assert sorted(record["formats"]) == ["openvino_fp32"]
    _point(published["s3"], record)
    fetch = default_fetch(published["endpoint"])
    with pytest.raises(EdgeClientError, match=f"format 'onnx_int8' is not published for {JOB_B}; "
                                              "published: openvino_fp32$"):
        load_model(fetch, read_record(fetch, POINTER), tmp_path / "cache", "onnx_int8")
    model = load_model(fetch, read_record(fetch, POINTER), tmp_path / "cache")
    pictures = _training_pictures(2)
    assert model.format == "openvino_fp32" and model.training_job_name == JOB_B
    assert [model.predict(p).class_index for p in _save(pictures, tmp_path)] == _frozen_classes(models, pictures)
