"""Moving a checkpoint directory between processes as bytes: a worker packs it, the driver unpacks it.

The archive is a plain uncompressed tar of regular files and directories. Unpacking treats the
bytes as untrusted: every member is checked before anything is written, and the result appears
at its destination atomically or not at all.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath


def pack_dir(path: str | Path) -> bytes:
    """Tar the contents of ``path`` (not the directory itself); symlinks and special files refused."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"cannot pack {root}: not a directory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()  # sorted walk: the same directory packs to the same member order
            for name in dirnames + sorted(filenames):
                full = Path(dirpath, name)
                arcname = full.relative_to(root).as_posix()
                if full.is_symlink():
                    # A link could point anywhere on the worker's disk; the driver must never follow it.
                    raise ValueError(f"cannot pack {root}: {arcname} is a symlink")
                if not (full.is_dir() or full.is_file()):
                    raise ValueError(f"cannot pack {root}: {arcname} is not a regular file or directory")
                tar.add(full, arcname=arcname, recursive=False, filter=_anonymous)
    return buf.getvalue()


def unpack_to(data: bytes, dest: str | Path) -> Path:
    """Extract an archive made by :func:`pack_dir` into ``dest``, which must not exist yet.

    Raises ``FileExistsError`` when ``dest`` exists and ``ValueError`` when the bytes are not a
    tar or hold anything but relative regular files and directories. On any error nothing is left
    at ``dest`` and no temporary directory remains.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"cannot unpack into {dest}: it already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A sibling temp dir: same filesystem, so the final os.replace is an atomic rename.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpacking", dir=dest.parent))
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member)
                # The "data" filter is a second guard behind our own checks.
                tar.extractall(tmp, members=members, filter="data")
        except tarfile.TarError as e:
            raise ValueError(f"cannot unpack into {dest}: not a valid checkpoint archive ({e})") from e
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _check_member(member: tarfile.TarInfo) -> None:
    name = PurePosixPath(member.name)
    # tarfile's own filter would quietly strip a leading "/"; we refuse instead, the archive is bad.
    if name.is_absolute() or member.name.startswith("\\"):
        raise ValueError(f"refusing archive member {member.name!r}: absolute path")
    if ".." in name.parts or ".." in member.name.split("\\"):
        raise ValueError(f"refusing archive member {member.name!r}: path leaves the destination")
    if not (member.isfile() or member.isdir()):
        # pack_dir never writes links or devices, so one here means the bytes were not ours.
        raise ValueError(f"refusing archive member {member.name!r}: not a regular file or directory")


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The worker's user and group names mean nothing on the driver.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
