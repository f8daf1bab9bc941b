"""The legacy pickle importer on small pickles with the tutorial's array layout."""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from headpose.datasets import legacy_pickle
from headpose.training import labels

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, SIZE = 7, 3, 84


class _Python2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (BINSTRING) and NumPy under ``numpy.core``,
    as in the tutorial's py2 pickle.

    Python 3 at protocol 2 wraps bytes in ``_codecs.encode``; Python 2 wrote numpy's raw
    buffers as plain ``str``, which only ``encoding="latin1"`` turns back into arrays.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        # NumPy 1 (all Python 2 pickles) lived in numpy.core; NumPy 2 writes numpy._core.
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _arrays():
    """The tutorial's layout: NCHW float32 in [0, 1] from BGR images, outputs (tilt, pan) / 90."""
    rng = np.random.default_rng(0)
    poses = [(t, p) for t in labels.TILT_ANGLES for p in labels.PAN_ANGLES]
    def split(n, offset):
        images = rng.integers(0, 256, size=(n, 3, SIZE, SIZE)).astype(np.float32) / 255
        outputs = np.array([poses[(offset + 7 * i) % len(poses)] for i in range(n)],
                           np.float32) / 90
        return images, outputs
    trn_im, trn_out = split(N_TRAIN, 0)
    test_im, test_out = split(N_TEST, 50)
    return trn_im, test_im, trn_out, test_out


def _write(path: Path, arrays, py2: bool = False) -> Path:
    with open(path, "wb") as handle:
        if py2:
            _Python2Pickler(handle, protocol=2).dump(arrays)
        else:
            pickle.dump(arrays, handle, protocol=2)
    return path


def _records(directory: Path, split: str):
    files = [str(p) for p in sorted(directory.glob(f"{split}-*.tfrecord"))]
    for raw in tf.data.TFRecordDataset(files):
        f = tf.train.Example.FromString(raw.numpy()).features.feature
        image = np.frombuffer(f["image"].bytes_list.value[0], np.uint8).reshape(SIZE, SIZE, 3)
        yield image, f["tilt"].float_list.value[0], f["pan"].float_list.value[0]


def test_refuses_without_explicit_trust(tmp_path):
    path = _write(tmp_path / "x.pkl", _arrays())
    for trust in (False, "yes", 1):
        with pytest.raises(legacy_pickle.UntrustedPickleError, match="--trust-pickle"):
            legacy_pickle.import_legacy_pickle(path, tmp_path / "out", trust_pickle=trust)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_without_the_flag(tmp_path, capsys):
    path = _write(tmp_path / "x.pkl", _arrays())
    assert legacy_pickle.main(["--pickle", str(path), "--out", str(tmp_path / "o")]) == 1
    assert "--trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("py2", [False, True], ids=["py3-protocol2", "py2-str-buffers"])
def test_imports_counts_labels_and_pixels(tmp_path, py2):
    arrays = _arrays()
    path = _write(tmp_path / "HeadPoseData_trn_test_x15_py2.pkl", arrays, py2=py2)
    manifest = legacy_pickle.import_legacy_pickle(path, tmp_path / "out", trust_pickle=True,
                                                  images_per_shard=4)
    assert manifest["settings"]["value_range"] == "unit"
    assert manifest["settings"]["channel_order"] == "bgr"
    assert manifest["splits"]["train"]["count"] == N_TRAIN
    assert manifest["splits"]["eval"]["count"] == N_TEST
    assert len(manifest["splits"]["train"]["shards"]) == 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest

    trn_im, test_im, trn_out, test_out = arrays
    for split, images, outputs in (("train", trn_im, trn_out), ("eval", test_im, test_out)):
        records = list(_records(tmp_path / "out", split))
        assert len(records) == len(images)
        per_class = [0] * labels.NUM_CLASSES
        for (image, tilt, pan), source, (src_tilt, src_pan) in zip(records, images, outputs):
            # BGR planes in, RGB pixels out: RGB channel 0 is the pickle's plane 2.
            expected = np.rint(source[::-1].transpose(1, 2, 0) * 255).astype(np.uint8)
            np.testing.assert_array_equal(image, expected)
            assert tilt == pytest.approx(src_tilt, abs=1e-6)  # column 0 is tilt
            assert pan == pytest.approx(src_pan, abs=1e-6)  # column 1 is pan
            per_class[labels.class_index(float(src_tilt), float(src_pan))] += 1
        assert manifest["splits"][split]["per_class"] == per_class


def test_byte_range_and_rgb_pickles(tmp_path):
    trn_im, test_im, trn_out, test_out = _arrays()
    arrays = (trn_im * 255, test_im * 255, trn_out, test_out)
    path = _write(tmp_path / "x.pkl", arrays)
    manifest = legacy_pickle.import_legacy_pickle(path, tmp_path / "out", trust_pickle=True,
                                                  channel_order="rgb")
    assert manifest["settings"]["value_range"] == "byte"
    image, _, _ = next(_records(tmp_path / "out", "train"))
    np.testing.assert_array_equal(image, np.rint(arrays[0][0].transpose(1, 2, 0)).astype(np.uint8))


def test_malformed_layouts_are_refused(tmp_path):
    trn_im, test_im, trn_out, test_out = _arrays()
    cases = {
        "three": (trn_im, test_im, trn_out),
        "nhwc": (trn_im.transpose(0, 2, 3, 1), test_im, trn_out, test_out),
        "outputs": (trn_im, test_im, trn_out[:, :1], test_out),
        "range": (trn_im * 300, test_im, trn_out, test_out),
    }
    for name, arrays in cases.items():
        path = _write(tmp_path / f"{name}.pkl", arrays)
        with pytest.raises(legacy_pickle.LegacyPickleError):
            legacy_pickle.import_legacy_pickle(path, tmp_path / name, trust_pickle=True)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_even_trusted_pickles_may_only_build_numpy_arrays(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps((_Exploit(),), protocol=2))
    with pytest.raises(legacy_pickle.LegacyPickleError, match="system"):
        legacy_pickle.import_legacy_pickle(path, tmp_path / "out", trust_pickle=True)


def test_cli_help_and_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "include")}
    result = subprocess.run([sys.executable, "-m", "headpose.datasets.legacy_pickle", "--help"],
                            capture_output=True, text=True, env=env, check=True)
    for option in ("--pickle", "--out", "--trust-pickle", "--channel-order", "--value-range"):
        assert option in result.stdout
    path = _write(tmp_path / "x.pkl", _arrays())
    assert legacy_pickle.main(["--pickle", str(path), "--out", str(tmp_path / "o"),
                               "--trust-pickle"]) == 0
