from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from orchestrator.transfer import pack_dir, unpack_to


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root, relative, with file contents (None for directories)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def _tar_with(name: str, data: bytes = b"evil", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_round_trip_keeps_files_and_empty_dirs(tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "manifest.json").write_text('{"format": 1}')
    (src / "sub" / "weights.bin").write_bytes(os.urandom(4096))
    (src / "sub" / "deeper" / "x.txt").write_text("x")

    dest = unpack_to(pack_dir(src), tmp_path / "out" / "ckpt")

    assert dest == tmp_path / "out" / "ckpt"
    assert _tree(dest) == _tree(src)


def test_pack_is_deterministic_for_same_tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("b", "a", "c"):
        (src / name).write_text(name)
    assert pack_dir(src) == pack_dir(src)


def test_pack_refuses_symlinks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "secret").write_text("s")
    (src / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match="symlink"):
        pack_dir(src)


def test_pack_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        pack_dir(tmp_path / "nope")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/evil", "/x"])
def test_unpack_refuses_paths_leaving_dest_and_leaves_nothing(tmp_path, name):
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(ValueError, match="refusing archive member"):
        unpack_to(_tar_with(name), parent / "ckpt")
    assert _leftovers(parent) == []
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_unpack_refuses_links(tmp_path, kind):
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(ValueError, match="not a regular file or directory"):
        unpack_to(_tar_with("link", kind=kind, linkname="/etc/passwd"), parent / "ckpt")
    assert _leftovers(parent) == []


def test_unpack_refuses_bytes_that_are_not_a_tar(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(ValueError, match="not a valid checkpoint archive"):
        unpack_to(b"this is not a tar archive" * 40, parent / "ckpt")
    assert _leftovers(parent) == []


def test_unpack_refuses_existing_dest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("new")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "f").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        unpack_to(pack_dir(src), dest)
    assert (dest / "f").read_text() == "old"
    assert _leftovers(tmp_path) == ["dest", "src"]
