"""Hostile and malformed model archives, built byte by byte in the tests."""
from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from headpose.artifacts.archive import (
    ArchiveError,
    UnsafeArchiveError,
    find_saved_model,
    pack_model_dir,
    safe_extract,
)


def tree(root: Path) -> list[str]:
    """Everything under ``root`` (links not followed), as sorted relative names."""
    return sorted(
        os.path.relpath(os.path.join(current, name), root)
        for current, dirs, files in os.walk(root)
        for name in dirs + files
    )


def file_member(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_member(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.fixture()
def workspace(tmp_path: Path) -> dict[str, Path]:
    """``tmp_path/work/dest`` is the target; ``tmp_path/outside`` is what attacks aim at."""
    (tmp_path / "work").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("do not touch")
    return {"root": tmp_path, "dest": tmp_path / "work" / "dest", "outside": tmp_path / "outside"}


def assert_refused(workspace, tar_path: Path, member: str, **caps) -> UnsafeArchiveError:
    before = tree(workspace["root"])
    with pytest.raises(UnsafeArchiveError) as raised:
        safe_extract(tar_path, workspace["dest"], **caps)
    assert raised.value.member == member
    assert member in str(raised.value)
    assert tree(workspace["root"]) == before, "something was written on refusal"
    assert (workspace["outside"] / "secret").read_text() == "do not touch"
    return raised.value


def test_parent_traversal_is_refused(workspace):
    archive = write_tar(
        workspace["root"] / "a.tar.gz",
        [file_member("export/ok.txt"), file_member("../outside/secret", b"overwritten")],
    )
    assert_refused(workspace, archive, "../outside/secret")


def test_nested_traversal_is_refused(workspace):
    archive = write_tar(
        workspace["root"] / "a.tar.gz", [file_member("export/../../../outside/evil")]
    )
    assert_refused(workspace, archive, "export/../../../outside/evil")


def test_absolute_path_is_refused(workspace):
    target = str(workspace["outside"] / "absolute")
    archive = write_tar(workspace["root"] / "a.tar.gz", [file_member(target)])
    assert_refused(workspace, archive, target)


def test_symlink_pointing_outside_is_refused(workspace):
    archive = write_tar(
        workspace["root"] / "a.tar.gz",
        [
            link_member("export/escape", "../../outside", tarfile.SYMTYPE),
            file_member("export/escape/planted", b"via the link"),
        ],
    )
    assert_refused(workspace, archive, "export/escape")


def test_absolute_symlink_is_refused(workspace):
    archive = write_tar(
        workspace["root"] / "a.tar.gz",
        [link_member("export/passwd", "/etc/passwd", tarfile.SYMTYPE)],
    )
    assert_refused(workspace, archive, "export/passwd")


def test_hardlink_outside_is_refused(workspace):
    archive = write_tar(
        workspace["root"] / "a.tar.gz",
        [link_member("export/secret", "../outside/secret", tarfile.LNKTYPE)],
    )
    assert_refused(workspace, archive, "export/secret")


def test_symlink_chain_is_refused_when_extracting(workspace):
    # Checked against an empty folder, "export/a/up" -> "../.." stays inside; once
    # "export/a" exists as a link to "export", it points above the destination. The
    # data filter re-checks every member against the disk as it extracts.
    archive = write_tar(
        workspace["root"] / "a.tar.gz",
        [
            link_member("export/a", ".", tarfile.SYMTYPE),
            link_member("export/a/up", "../..", tarfile.SYMTYPE),
            file_member("export/a/up/planted", b"escaped"),
        ],
    )
    assert_refused(workspace, archive, "export/a/up")


def test_device_file_is_refused(workspace):
    info = tarfile.TarInfo("export/null")
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    archive = write_tar(workspace["root"] / "a.tar.gz", [(info, None)])
    assert_refused(workspace, archive, "export/null")


def test_huge_declared_member_is_refused_before_reading_its_data(workspace):
    # A header declaring 64 GiB followed by no data at all: refusing it must not need
    # (or try) to read, let alone write, those bytes.
    huge = tarfile.TarInfo("export/Servo/1/variables/huge.data-00000-of-00001")
    huge.size = 64 * 1024**3
    archive = workspace["root"] / "bomb.tar.gz"
    archive.write_bytes(gzip.compress(huge.tobuf(tarfile.PAX_FORMAT)))
    error = assert_refused(workspace, archive, huge.name)
    assert "cap" in error.reason


def test_total_size_cap_counts_all_members(workspace):
    archive = write_tar(
        workspace["root"] / "a.tar.gz",
        [file_member("export/one", b"a" * 600), file_member("export/two", b"b" * 600)],
    )
    assert_refused(workspace, archive, "export/two", max_total_bytes=1000, max_member_bytes=1000)


def test_member_size_cap(workspace):
    archive = write_tar(workspace["root"] / "a.tar.gz", [file_member("export/big", b"a" * 2048)])
    assert_refused(workspace, archive, "export/big", max_member_bytes=1024)


@pytest.mark.parametrize(
    "payload",
    [
        b"this is not gzip at all",
        gzip.compress(b"\0" * 10)[:-6],  # gzip stream cut short
        b"\x1f\x8b\x08\x00" + b"\xff" * 200,  # gzip magic, garbage body
    ],
    ids=["not-gzip", "truncated-gzip", "garbage-gzip"],
)
def test_corrupt_archive_is_a_clear_error(workspace, payload):
    archive = workspace["root"] / "corrupt.tar.gz"
    archive.write_bytes(payload)
    before = tree(workspace["root"])
    with pytest.raises(ArchiveError, match="not a readable tar archive"):
        safe_extract(archive, workspace["dest"])
    assert tree(workspace["root"]) == before


def test_truncated_tar_data_is_a_clear_error(workspace, tmp_path):
    good = write_tar(tmp_path / "good.tar.gz", [file_member("export/a", os.urandom(4096))])
    archive = workspace["root"] / "cut.tar.gz"
    archive.write_bytes(gzip.compress(gzip.decompress(good.read_bytes())[:1024]))
    before = tree(workspace["root"])
    with pytest.raises(ArchiveError):
        safe_extract(archive, workspace["dest"])
    assert tree(workspace["root"]) == before


def test_non_empty_destination_is_refused(workspace):
    archive = write_tar(workspace["root"] / "a.tar.gz", [file_member("export/a")])
    workspace["dest"].mkdir()
    (workspace["dest"] / "existing").write_text("keep")
    with pytest.raises(ArchiveError, match="not an empty folder"):
        safe_extract(archive, workspace["dest"])
    assert tree(workspace["dest"]) == ["existing"]


def test_refusal_keeps_an_empty_destination_empty(workspace):
    archive = write_tar(workspace["root"] / "a.tar.gz", [file_member("../escape")])
    workspace["dest"].mkdir()
    assert_refused(workspace, archive, "../escape")
    assert workspace["dest"].is_dir() and tree(workspace["dest"]) == []


def make_model_dir(root: Path, exports: tuple[str, ...] = ("1700000000",)) -> Path:
    for stamp in exports:
        saved = root / "export" / "Servo" / stamp
        (saved / "variables").mkdir(parents=True)
        (saved / "saved_model.pb").write_bytes(b"graph " + stamp.encode())
        (saved / "variables" / "variables.index").write_bytes(b"index")
        (saved / "fingerprint.pb").write_bytes(b"fp")
    (root / "metrics.json").write_text('{"eval_accuracy": 0.5}')
    return root


def test_pack_extract_round_trip(workspace, tmp_path):
    model = make_model_dir(tmp_path / "model")
    archive = pack_model_dir(model, workspace["root"] / "model.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert names == sorted(names, key=lambda n: n.split("/"))
        assert names[0] == "export" and "metrics.json" in names
        assert all(m.uid == 0 and m.gid == 0 and m.uname == "" and m.mtime == 0 for m in tar)
    dest = safe_extract(archive, workspace["dest"])
    assert tree(dest) == tree(model)
    saved = find_saved_model(dest)
    assert saved == dest / "export" / "Servo" / "1700000000"
    assert (saved / "saved_model.pb").read_bytes() == b"graph 1700000000"


def test_pack_is_deterministic(tmp_path):
    model = make_model_dir(tmp_path / "model")
    first = pack_model_dir(model, tmp_path / "first.tar.gz").read_bytes()
    for path in model.rglob("*"):
        os.utime(path, (1, 1))  # different times must not change the archive
    second = pack_model_dir(model, tmp_path / "second.tar.gz").read_bytes()
    assert first == second


def test_pack_refuses_symlinks(tmp_path):
    model = make_model_dir(tmp_path / "model")
    (model / "link").symlink_to("/etc/passwd")
    with pytest.raises(ArchiveError, match="not a regular file"):
        pack_model_dir(model, tmp_path / "model.tar.gz")
    assert not (tmp_path / "model.tar.gz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_links_inside_the_archive_are_allowed(workspace):
    archive = write_tar(
        workspace["root"] / "a.tar.gz",
        [
            file_member("export/Servo/1/saved_model.pb", b"pb"),
            link_member("export/latest", "Servo/1", tarfile.SYMTYPE),
        ],
    )
    dest = safe_extract(archive, workspace["dest"])
    assert (dest / "export" / "latest" / "saved_model.pb").read_bytes() == b"pb"


def test_no_export_folder(tmp_path):
    root = tmp_path / "extracted"
    (root / "model" / "1").mkdir(parents=True)
    (root / "model" / "1" / "saved_model.pb").write_bytes(b"pb")
    with pytest.raises(ArchiveError, match="no export/\\*/\\*/saved_model.pb") as raised:
        find_saved_model(root)
    assert "model/1/saved_model.pb" in str(raised.value)


def test_empty_extraction_has_no_saved_model(tmp_path):
    with pytest.raises(ArchiveError, match="found at: nowhere"):
        find_saved_model(tmp_path)


def test_two_exports_are_ambiguous(tmp_path):
    root = make_model_dir(tmp_path / "model", exports=("1700000000", "1700000001"))
    with pytest.raises(ArchiveError, match="found 2") as raised:
        find_saved_model(root)
    assert "export/Servo/1700000000" in str(raised.value)
    assert "export/Servo/1700000001" in str(raised.value)
