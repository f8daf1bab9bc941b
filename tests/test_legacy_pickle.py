"""The legacy pickle importer on small pickles with the tutorial's array layout."""
from __future__ import annotations

import codecs
import json
import os
import pickle
import pickletools
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
# What protocol 0 is made of: pickletools' names of the opcodes that predate protocol 1.
TEXT_OPCODES = {op.name for op in pickletools.opcodes if op.proto == 0}


class _Python2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` and NumPy under ``numpy.core``, as in the
    tutorial's py2 pickle: at protocol 0 (Python 2's default, which the tutorial used) as
    ``STRING``, a quoted line with backslash escapes; at protocol 2 as ``BINSTRING``.

    Python 3 wraps bytes in ``_codecs.encode`` instead; Python 2 wrote numpy's raw
    buffers as plain ``str``, which only ``encoding="latin1"`` turns back into arrays.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if self.proto == 0:
            # Python 2's repr-style quoting: what its protocol-0 pickler wrote for a str.
            self.write(pickle.STRING + b"'" + codecs.escape_encode(data)[0] + b"'\n")
        elif len(data) < 256:
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


def _write(path: Path, arrays, py2: bool = False, protocol: int = 2) -> Path:
    with open(path, "wb") as handle:
        if py2:
            _Python2Pickler(handle, protocol=protocol).dump(arrays)
        else:
            handle.write(pickle.dumps(arrays, protocol=protocol))
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


WRITERS = {
    "py3-protocol0": dict(py2=False, protocol=0),
    "py2-protocol0": dict(py2=True, protocol=0),
    "py3-protocol2": dict(py2=False, protocol=2),
    "py2-protocol2": dict(py2=True, protocol=2),
}


def test_the_protocol_0_writers_write_text_opcodes_only(tmp_path):
    # No protocol header and no binary opcodes. Python 3 writes raw buffers as
    # _codecs.encode of a unicode-escaped line; Python 2 as quoted STRING lines, whose
    # non-ASCII escapes pickletools cannot list, so those are checked by their bytes.
    py3 = _write(tmp_path / "py3.pkl", _arrays(), **WRITERS["py3-protocol0"]).read_bytes()
    assert {op.name for op, _, _ in pickletools.genops(py3)} <= TEXT_OPCODES
    assert b"c_codecs\nencode\n" in py3
    py2 = _write(tmp_path / "py2.pkl", _arrays(), **WRITERS["py2-protocol0"]).read_bytes()
    assert not py2.startswith(pickle.PROTO) and b"_codecs" not in py2
    assert py2.startswith(b"(cnumpy.core.multiarray\n_reconstruct\n") and b"\nS'" in py2


@pytest.mark.parametrize("writer", WRITERS)
def test_imports_counts_labels_and_pixels(tmp_path, writer):
    arrays = _arrays()
    path = _write(tmp_path / "HeadPoseData_trn_test_x15_py2.pkl", arrays, **WRITERS[writer])
    manifest = legacy_pickle.import_legacy_pickle(path, tmp_path / "out", trust_pickle=True,
                                                  images_per_shard=4)
    assert manifest["settings"]["value_range"] == "unit"
    assert manifest["settings"]["pickle_channel_order"] == "bgr"
    assert manifest["channel_order"] == manifest["settings"]["channel_order"] == "bgr"
    assert manifest["image"]["channels"] == "BGR"
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
            # BGR planes in, BGR pixels out: channel c of a pixel is the pickle's plane c.
            expected = np.rint(source.transpose(1, 2, 0) * 255).astype(np.uint8)
            np.testing.assert_array_equal(image, expected)
            assert tilt == pytest.approx(src_tilt, abs=1e-6)  # column 0 is tilt
            assert pan == pytest.approx(src_pan, abs=1e-6)  # column 1 is pan
            per_class[labels.class_index(float(src_tilt), float(src_pan))] += 1
        assert manifest["splits"][split]["per_class"] == per_class


@pytest.mark.parametrize("pickle_order, shard_order, reversed_", [
    ("bgr", "rgb", True), ("rgb", "bgr", True), ("rgb", "rgb", False),
])
def test_channels_are_reversed_where_pickle_and_shards_differ(tmp_path, pickle_order, shard_order,
                                                               reversed_):
    trn_im, test_im, trn_out, test_out = _arrays()
    arrays = (trn_im * 255, test_im * 255, trn_out, test_out)
    path = _write(tmp_path / "x.pkl", arrays, protocol=0)
    manifest = legacy_pickle.import_legacy_pickle(path, tmp_path / "out", trust_pickle=True,
                                                  channel_order=shard_order,
                                                  pickle_channel_order=pickle_order)
    assert manifest["settings"]["value_range"] == "byte"
    assert (manifest["channel_order"], manifest["image"]["channels"]) == (shard_order, shard_order.upper())
    image, _, _ = next(_records(tmp_path / "out", "train"))
    planes = arrays[0][0][::-1] if reversed_ else arrays[0][0]
    np.testing.assert_array_equal(image, np.rint(planes.transpose(1, 2, 0)).astype(np.uint8))


def test_an_unknown_channel_order_is_refused_before_unpickling(tmp_path):
    path = _write(tmp_path / "x.pkl", _arrays())
    for keyword in ("channel_order", "pickle_channel_order"):
        with pytest.raises(ValueError, match="channel_order must be one of bgr, rgb"):
            legacy_pickle.import_legacy_pickle(path, tmp_path / "out", trust_pickle=True,
                                               **{keyword: "RGB"})
    assert not (tmp_path / "out").exists()


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
    for option in ("--pickle", "--out", "--trust-pickle", "--channel-order {bgr,rgb}",
                   "--pickle-channel-order {bgr,rgb}", "--value-range"):
        assert option in result.stdout
    path = _write(tmp_path / "x.pkl", _arrays())
    assert legacy_pickle.main(["--pickle", str(path), "--out", str(tmp_path / "o"),
                               "--trust-pickle"]) == 0
