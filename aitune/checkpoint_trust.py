"""What a checkpoint may make this process do: its files, and the code its manifest names.

A manifest is data anyone with write access to the checkpoint can edit. These checks run
before anything is imported or loaded: the directory holds exactly the manifest and the listed
artifacts (no extra file, no stray directory, no link), and the manifest names only model
factories and backend classes the caller allowed.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Collection, Union

from aitune.torch.backend.backend import Backend
from aitune.torch.backend.registry import InvalidBackendError, UnknownBackendError, get_backend_class, is_import_path

#: ``True`` trusts whatever the manifest names; a collection lists the import paths allowed; None: none
Allowlist = Union[Collection[str], bool, None]


class CheckpointError(ValueError):
    """A checkpoint was refused; the message names the file or the mismatch."""


def check_listing(root: Path, manifest_name: str, artifact_paths: list[str]) -> None:
    """Refuse any symlink, any file but the manifest and the artifacts, any directory holding none."""
    files = {manifest_name} | {PurePosixPath(p).as_posix() for p in artifact_paths}
    dirs = {parent.as_posix() for p in files for parent in PurePosixPath(p).parents if parent.as_posix() != "."}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames) + sorted(filenames):
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                raise CheckpointError(f"checkpoint {root} holds a symbolic link {rel}: links are refused, even to a listed artifact")
            if name in dirnames:
                if rel not in dirs:
                    raise CheckpointError(f"checkpoint {root} holds a directory {rel} that its manifest does not list")
            elif not full.is_file():
                raise CheckpointError(f"checkpoint {root} holds {rel}, which is not a regular file")
            elif rel not in files:
                raise CheckpointError(
                    f"checkpoint {root} holds a file {rel} that its manifest does not list: a checkpoint holds only "
                    f"{manifest_name} and its artifacts"
                )


def factories_in(value: Any) -> list[str]:
    """Every model factory named in a backend state, however deep (a dict with a ``factory`` entry)."""
    found = []
    if isinstance(value, dict):
        if "factory" in value:
            found.append(value["factory"])
        for v in value.values():
            found.extend(factories_in(v))
    elif isinstance(value, list):
        for v in value:
            found.extend(factories_in(v))
    return found


def candidate_allowlists(factory: str | None, backend: str) -> tuple[list[str], list[str]]:
    """``(allow_factories, allow_backends)`` for a checkpoint of one candidate: its model's factory
    (none without one), and its backend where that is a plug-in import path (a built-in backend
    needs no allowing). What the store, a sweep's spec or a deploy root's ``install.json`` names
    for the candidate, and nothing else its manifest names, may be imported."""
    return ([factory] if factory else []), ([backend] if is_import_path(backend) else [])


def _allowed(name: str, allow: Allowlist, what: str) -> bool:
    if allow is True:
        return True
    if allow is None or allow is False:
        return False
    if isinstance(allow, (str, bytes)):
        raise TypeError(f"{what} must be a collection of import paths or True, not the string {allow!r}")
    return name in set(allow)


def check_factories(state: dict[str, Any], allow_factories: Allowlist, where: str) -> None:
    """Refuse a model factory the caller did not allow, before anything imports it."""
    for factory in factories_in(state):
        if not isinstance(factory, str):
            raise CheckpointError(f"{where}: model factory {factory!r} is not an import path")
        if not _allowed(factory, allow_factories, "allow_factories"):
            raise CheckpointError(
                f"{where}: the model factory {factory!r} is not allowed: pass allow_factories=[{factory!r}] "
                "(the factories you expect), or allow_factories=True to trust everything this manifest names"
            )


def backend_class(ref: Any, allow_backends: Allowlist, where: str) -> type[Backend]:
    """The manifest's backend class: a built-in name always, a plug-in import path only when allowed."""
    if not isinstance(ref, str):
        raise CheckpointError(f"{where}: backend {ref!r} is not a backend name")
    if is_import_path(ref) and not _allowed(ref, allow_backends, "allow_backends"):
        raise CheckpointError(
            f"{where}: the plug-in backend {ref!r} is not allowed: pass allow_backends=[{ref!r}], "
            "or allow_backends=True to trust everything this manifest names"
        )
    try:
        return get_backend_class(ref)
    except (UnknownBackendError, InvalidBackendError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
