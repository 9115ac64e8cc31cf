"""The deploy root: where a serving machine keeps the tuned checkpoints it runs.

Layout (every name below a model is written by this module only)::

    ROOT/MODEL/DEVICE_CLASS/device_class.json       the device class (name, versions) and its full key
    ROOT/MODEL/DEVICE_CLASS/serving.json            serving settings chosen under a latency target (aitune.serving_config)
    ROOT/MODEL/DEVICE_CLASS/bN/current              the version being served (a one-line file)
    ROOT/MODEL/DEVICE_CLASS/bN/vNNNN-SHA12/         one folder per installed version:
        install.json                                what was installed, from which sweep and winner
        reference.pt                                sample and eager fp32 outputs to verify against
        checkpoint/                                 the aitune checkpoint (manifest.json + artifacts/)
        batching.json                               whether its rows may be combined (aitune.batching), once verified

``DEVICE_CLASS`` is the first 16 hex digits of the SHA-256 of
:meth:`aitune.environment.Environment.device_class`. A version is installed whole (staged, then
renamed), verified where it lies, and only then does ``current`` switch to it (``os.replace``,
atomic). Earlier versions stay; :func:`rollback` switches back to the one before, verified. A
version that fails verification is removed and ``current`` stays as it was.

The deploy root is trusted like the store: ``install.json`` names the model factory that loading
imports. The checkpoint itself is checked against the manifest SHA-256 recorded at install and
every artifact's checksum, so an edited file is refused at load.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from aitune.batching import RowCheck, check_rows
from aitune.canonical import sha256_of
from aitune.checkpoint import CheckpointError, load_checkpoint, manifest_sha256, verify_checkpoint
from aitune.checkpoint_trust import candidate_allowlists
from aitune.environment import describe_environment
from aitune.files import fsync_dir, write_atomic
from aitune.reference import ReferenceFormatError, unpack_reference
from aitune.shapes import Shapes

log = logging.getLogger(__name__)

INSTALL, REFERENCE, CHECKPOINT, CURRENT, DEVICE_CLASS = "install.json", "reference.pt", "checkpoint", "current", "device_class.json"
BATCHING = "batching.json"
_VERSION = re.compile(r"v(\d{4,})-[0-9a-f]{12}\Z")
_BATCH = re.compile(r"b(\d+)((?:-[A-Za-z_][A-Za-z0-9_]*=\d+(?:\.\.\d+)?)*)\Z")
#: a shape point's label (aitune.shapes.label): '' or axis=size[,axis=size]; a dynamic-shape
#: artifact's range: axis=low..high
_AXIS = r"[A-Za-z_][A-Za-z0-9_]*=[1-9]\d*(?:\.\.[1-9]\d*)?"
_SHAPE = re.compile(rf"\A(?:{_AXIS}(?:,{_AXIS})*)?\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
#: what a model name may be: it is a folder of the deploy root, one path component
MODEL_NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
#: folders a deploy root may not be (nor, for the first group, be inside of)
_SYSTEM_TREES = ("/proc", "/sys", "/dev", "/etc", "/boot", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                 "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64", "/usr/include", "/usr/libexec")
_SYSTEM_FOLDERS = {"/", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/tmp", "/usr", "/usr/local",
                   "/usr/share", "/var", "/var/lib", "/var/log", "/var/tmp", "/var/cache"}


class DeployRootError(RuntimeError):
    """The deploy root can't be used (unwritable, damaged, nothing installed); one clear line."""


def model_name_problem(name: Any) -> str | None:
    """Why ``name`` can't be a model's folder in a deploy root (None: it can)."""
    if not isinstance(name, str):
        return f"a model name must be a string, got {type(name).__name__}"
    if not _MODEL_NAME.match(name):
        shown = repr(name) if len(name) <= 80 else repr(name[:80]) + "..."
        return f"model name {shown} can't be a folder of the deploy root: use {MODEL_NAME_RULE}"
    return None


def check_model_name(name: Any) -> str:
    problem = model_name_problem(name)
    if problem:
        raise DeployRootError(problem)
    return name


def default_root() -> Path:
    """``$XDG_CACHE_HOME/aitune/deploy``, else ``~/.cache/aitune/deploy``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "aitune" / "deploy"


def root_problem(root: Any) -> str | None:
    """Why ``root`` can't be a deploy root (None: it can): empty, a system folder, a file."""
    if root is None:
        return None
    if not isinstance(root, (str, os.PathLike)):
        return f"deploy root must be a path, got {type(root).__name__}"
    text = os.fspath(root)
    if isinstance(text, bytes) or not text.strip():
        return "deploy root is empty: give a directory (or leave it out for ~/.cache/aitune/deploy)"
    if has_control_characters(text):
        return f"deploy root {text!r} has control characters"
    path = Path(os.path.abspath(Path(text).expanduser()))
    for p in (path, path.resolve()):
        if str(p) in _SYSTEM_FOLDERS or p == Path.home() or any(p == Path(t) or Path(t) in p.parents for t in _SYSTEM_TREES):
            return f"deploy root {path} is a system folder: give a folder of its own, e.g. {default_root()}"
    if path.exists() and not path.is_dir():
        return f"deploy root {path} is a file, not a directory"
    return None


def has_control_characters(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The deploy root as an absolute path (None: :func:`default_root`); DeployRootError for an
    empty one, a system folder or a file."""
    problem = root_problem(root)
    if problem:
        raise DeployRootError(problem)
    return Path(os.path.abspath(Path(os.fspath(root)).expanduser())) if root is not None else default_root()


def check_no_links(root: Path, path: Path) -> None:
    """Refuse a symbolic link at ``path`` or at any folder between ``root`` and it (the root itself may be one)."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise DeployRootError(f"{path} is outside the deploy root {root}") from None
    here = root
    for part in parts:
        if part in ("", ".", ".."):
            raise DeployRootError(f"{path}: leaves the deploy root {root}")
        here = here / part
        if here.is_symlink():
            raise DeployRootError(f"{here} is a symbolic link; a deploy root holds no links")


def read_small(path: Path, limit: int = 1 << 20) -> bytes:
    """A file's bytes, refusing a link and anything larger than ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DeployRootError(f"{path} is a symbolic link; a deploy root holds no links") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise DeployRootError(f"{path}: larger than {limit} bytes; not a file this deploy root wrote")
    return data


def device_class_key(device: torch.device | str) -> str:
    return sha256_of(describe_environment(torch.device(device)).device_class())


def class_dir_name(class_key: str) -> str:
    return class_key[:16]


@dataclass
class Install:
    """What one version folder holds and where it came from (``install.json``)."""

    model: str
    batch_size: int
    device_class_key: str
    version: str
    manifest_sha256: str
    #: import path of the model factory the checkpoint names; loading imports only this one
    factory: str | None
    #: built-in backend name or a plug-in's import path
    backend: str
    #: shapes of the tensor inputs, positional then keyword (sorted by name): how calls are routed
    input_shapes: list[list[int]]
    tolerance: dict[str, float]
    reference_sha256: str
    installed_at: float
    sweep_id: str | None = None
    winner_key: str | None = None
    candidate: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: dtypes of the tensor inputs, in the order of ``input_shapes``: read from the verified
    #: ``reference.pt`` at load (not written to ``install.json``)
    input_dtypes: list[str] | None = None
    #: how the winner was judged when it is more than ``tolerance`` (aitune.accuracy.Criteria: accuracy
    #: gates; quantized winners' replace the tolerance); None: the tolerance alone
    criteria: dict[str, Any] | None = None
    #: the names of the tensor inputs, in the order of ``input_shapes`` (the spec's names, ``input_N``
    #: for unnamed positional ones, the keywords as they are); None: installed before names were kept
    input_names: list[str] | None = None
    #: the winner's median latency (ms) in its sweep: what dynamic batching plans by (aitune.batching)
    median_ms: float | None = None
    #: ``batching.json``, read back at load: whether the rows of a batch are independent (None: not checked)
    row_check: RowCheck | None = None
    #: read from the verified ``reference.pt`` at load (not written to ``install.json``): how many of
    #: the tensor inputs are positional, and each output's (path, shape, dtype)
    positional_inputs: int | None = None
    outputs: list[tuple[str, list[int], str]] | None = None
    #: the shape point of a model whose axes vary (``seq=64``: aitune.shapes.label); '' for fixed shapes
    shape: str = ""
    #: the model's axes that vary (aitune.shapes.Shapes.to_dict) and ``padding``: why padding up to a
    #: bucket is refused for it (None: verified); None for a model whose shapes are fixed
    shapes: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("input_dtypes", "row_check", "positional_inputs", "outputs"):
            d.pop(name)
        if not d["shape"]:
            d.pop("shape")
        for name in ("criteria", "input_names", "median_ms", "shapes"):  # an install without them reads as it always did
            if d[name] is None:
                d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Install":
        """Every field checked for its type and form (the file is read back from disk: trusted for nothing)."""
        if not isinstance(d, dict):
            raise ValueError(f"not a JSON object but {type(d).__name__}")

        def want(name, ok, what, optional=False):
            value = d.get(name)
            if value is None and optional:
                return None
            if name not in d or not ok(value):
                raise ValueError(f"{name} must be {what}, got {_short(value)}")
            return value

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

        def is_hex(v):
            return isinstance(v, str) and bool(_HEX64.match(v))

        def is_str(v):
            return isinstance(v, str) and bool(v) and not has_control_characters(v)

        return cls(
            model=want("model", lambda v: model_name_problem(v) is None, "a model name"),
            batch_size=want("batch_size", lambda v: is_int(v) and v > 0, "a positive integer"),
            device_class_key=want("device_class_key", is_hex, "64 hex digits"),
            version=want("version", lambda v: isinstance(v, str) and bool(_VERSION.match(v)), "vNNNN-SHA12"),
            manifest_sha256=want("manifest_sha256", is_hex, "the manifest's SHA-256 (64 hex digits)"),
            factory=want("factory", is_str, "an import path", optional=True),
            backend=want("backend", is_str, "a backend name"),
            input_shapes=want("input_shapes", lambda v: isinstance(v, list) and all(
                isinstance(s, list) and all(is_int(x) and x >= 0 for x in s) for s in v), "a list of shapes"),
            tolerance=want("tolerance", lambda v: isinstance(v, dict) and all(
                isinstance(k, str) and is_num(x) for k, x in v.items()), "{name: number}"),
            reference_sha256=want("reference_sha256", is_hex, "64 hex digits"),
            installed_at=want("installed_at", is_num, "a time"),
            sweep_id=want("sweep_id", is_str, "a string", optional=True),
            winner_key=want("winner_key", is_str, "a string", optional=True),
            candidate=want("candidate", is_str, "a string", optional=True),
            extra=want("extra", lambda v: isinstance(v, dict), "an object", optional=True) or {},
            criteria=want("criteria", _criteria_ok, "accuracy criteria {tolerance, gates, elementwise}", optional=True),
            input_names=want("input_names", lambda v: isinstance(v, list) and len(v) == len(d.get("input_shapes") or [])
                             and len(set(v)) == len(v) and all(is_str(x) and len(x) <= 256 for x in v),
                             "one distinct name per input shape", optional=True),
            median_ms=want("median_ms", lambda v: is_num(v) and v > 0, "a positive number", optional=True),
            shape=want("shape", _shape_ok, "a shape point such as 'seq=64'", optional=True) or "",
            shapes=want("shapes", _shapes_ok, "the model's axes {axes, padding}", optional=True),
        )


def _shape_ok(value: Any) -> bool:
    return isinstance(value, str) and bool(_SHAPE.match(value))


def _shapes_ok(value: Any) -> bool:
    try:
        Shapes.from_dict(value)
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
    padding = value.get("padding")
    return padding is None or (isinstance(padding, str) and not has_control_characters(padding))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


@dataclass
class Verified:
    """The outcome of checking one installed version on this device."""

    ok: bool
    max_abs_err: float | None = None
    median_ms: float | None = None
    reason: str | None = None
    #: whether the rows of its batch are independent (batch sizes above 1; aitune.batching)
    row_check: RowCheck | None = None


def input_shapes(args: tuple, kwargs: dict) -> list[list[int]]:
    return [list(t.shape) for t in _tensors(args, kwargs)]


def input_dtypes(args: tuple, kwargs: dict) -> list[str]:
    return [str(t.dtype).removeprefix("torch.") for t in _tensors(args, kwargs)]


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return tensors + [kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]


def _read_reference(data: bytes, where: Path | str) -> dict[str, Any]:
    """A ``reference.pt``'s content, its form checked; DeployRootError naming ``where`` if it is not one."""
    try:
        return unpack_reference(data)
    except ReferenceFormatError as exc:
        raise DeployRootError(f"{where}: {str(exc).replace('this project', 'this deploy root')}") from None


def install(root, checkpoint_dir: Path, reference: bytes, *, device: torch.device | str, model: str, batch_size: int,
            tolerance: dict[str, float], factory: str | None, latency_s: float = 0.05, **origin: Any) -> tuple[Path, Verified]:
    """Stage, verify on ``device`` and (when it passed) make current: the whole install, in one process."""
    env = describe_environment(torch.device(device))
    version_dir, new = stage(root, checkpoint_dir, reference, model=model, batch_size=batch_size,
                             class_key=sha256_of(env.device_class()), device_class=env.device_class(),
                             tolerance=tolerance, factory=factory, **origin)
    verified = verify_version(version_dir, device, latency_s)
    activate(version_dir, verified, new)
    return version_dir, verified


def batch_dir(root: Path, model: str, class_key: str, batch_size: int, shape: str = "") -> Path:
    """``ROOT/MODEL/CLASS/bN`` (``bN-seq=64`` at a shape point): the model name must be one plain path
    component (DeployRootError if not)."""
    check_model_name(model)
    if not (isinstance(class_key, str) and _HEX64.match(class_key)):
        raise DeployRootError(f"device class key {_short(class_key)} is not 64 hex digits")
    if not _shape_ok(shape):
        raise DeployRootError(f"shape point {_short(shape)} is not axis=size[,axis=size]")
    return Path(root) / model / class_dir_name(class_key) / batch_folder(batch_size, shape)


def batch_folder(batch_size: int, shape: str = "") -> str:
    return f"b{int(batch_size)}" + "".join(f"-{part}" for part in shape.split(",") if part)


def check_writable(root: str | os.PathLike | None) -> Path:
    """Create ``root`` if needed and prove a file can be written there; DeployRootError if not."""
    path = resolve_root(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise DeployRootError(f"deploy root {path} can't be written: {exc.strerror or exc}") from None
    return path


@contextlib.contextmanager
def _locked(root: Path, folder: Path, create: bool = True) -> Iterator[None]:
    """One installer at a time per (model, device class, batch): targets on one node share the root.

    No link between the root and ``folder`` is followed (a lock file is never made elsewhere)."""
    check_no_links(root, folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            check_no_links(root, folder)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise DeployRootError(f"{folder} can't be written: {exc.strerror or exc}") from None
    with os.fdopen(fd, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def versions(folder: Path) -> list[str]:
    """Installed versions, oldest first; a version folder that is a link is refused."""
    if folder.is_symlink():
        raise DeployRootError(f"{folder} is a symbolic link; a deploy root holds no links")
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if _VERSION.match(p.name):
            if p.is_symlink():
                raise DeployRootError(f"{p} is a symbolic link; a deploy root holds no links")
            if p.is_dir():
                found.append(p.name)
    return sorted(found, key=lambda n: int(_VERSION.match(n).group(1)))


def current_version(folder: Path) -> str | None:
    """The version ``current`` names (None: no ``current``). Its content is never shown in an error."""
    try:
        data = read_small(folder / CURRENT, limit=64)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DeployRootError(f"{folder / CURRENT}: can't be read: {exc.strerror or exc}") from None
    try:
        name = data.decode("ascii").strip()
    except UnicodeDecodeError:
        name = ""
    if not _VERSION.match(name):
        raise DeployRootError(f"{folder / CURRENT}: does not name a version (vNNNN-SHA12); deploy again or roll back")
    version = folder / name
    if version.is_symlink():
        raise DeployRootError(f"{version} is a symbolic link; a deploy root holds no links")
    if not version.is_dir():
        raise DeployRootError(f"{folder / CURRENT}: points at {name}, which is not an installed version")
    return name


def _switch(folder: Path, version: str) -> None:
    write_atomic(folder / CURRENT, (version + "\n").encode())  # readers see the old version or the new one


def read_install(version_dir: Path) -> Install:
    """``install.json``, every field checked, and that it describes the folder it is in."""
    file = version_dir / INSTALL
    try:
        install = Install.from_dict(json.loads(read_small(file)))
    except DeployRootError:
        raise
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "nested too deep" if isinstance(exc, RecursionError) else exc
        raise DeployRootError(f"{file}: unreadable install record: {why}") from None
    batch, klass, model = version_dir.parent.name, version_dir.parent.parent.name, version_dir.parent.parent.parent.name
    where = f"{model}/{klass}/{batch}/{version_dir.name}"
    folder = batch_folder(install.batch_size, install.shape)
    if (install.version, folder, class_dir_name(install.device_class_key), install.model) != (
            version_dir.name, batch, klass, model):
        raise DeployRootError(f"{file}: describes {install.model}/{class_dir_name(install.device_class_key)}/"
                              f"{folder}/{install.version}, not the folder {where} it is in")
    if not install.version.endswith(install.manifest_sha256[:12]):
        raise DeployRootError(f"{file}: version {install.version} is not named after its manifest_sha256")
    return install


def names_of_inputs(args: tuple, kwargs: dict, positional: list[str | None] | None) -> list[str]:
    """One name per tensor input, in the order of :func:`input_shapes`: positional ones by the given
    names (``input_N`` where none), keyword ones by their keyword."""
    given = list(positional or [])
    names = [given[i] if i < len(given) and given[i] else f"input_{i}"
             for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    names += [k for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]
    seen: set[str] = set()
    for i, name in enumerate(names):  # a positional name equal to a keyword: keep both reachable
        names[i] = name if name not in seen else f"{name}_{i}"
        seen.add(names[i])
    return names


def _refresh(version_dir: Path, input_names: list[str] | None, median_ms: float | None,
             shapes: dict[str, Any] | None = None) -> None:
    """An installed copy deployed again keeps its files, but takes the input names, the latency and
    the axes of the sweep installing it now (where given): install.json rewritten whole."""
    install = read_install(version_dir)
    fresh = {"input_names": input_names or install.input_names, "median_ms": median_ms or install.median_ms,
             "shapes": shapes or install.shapes}
    if fresh != {"input_names": install.input_names, "median_ms": install.median_ms, "shapes": install.shapes}:
        install.input_names, install.median_ms, install.shapes = fresh["input_names"], fresh["median_ms"], fresh["shapes"]
        write_atomic(version_dir / INSTALL, (json.dumps(install.to_dict(), indent=2, sort_keys=True) + "\n").encode())


def _class_record(class_key: str, device_class: dict[str, Any]) -> bytes:
    return (json.dumps({"key": class_key, "device_class": device_class}, indent=2, sort_keys=True) + "\n").encode()


def _installed_copy_problem(version_dir: Path, sha: str, reference: bytes) -> str | None:
    """Why an installed version of this same checkpoint can't be reused as it is (None: it can)."""
    try:
        install = read_install(version_dir)
        if install.manifest_sha256 != sha:
            return "it holds another checkpoint"
        verify_checkpoint(version_dir / CHECKPOINT, sha)
        if hashlib.sha256(read_small(version_dir / REFERENCE, 1 << 34)).hexdigest() != hashlib.sha256(reference).hexdigest():
            return f"{version_dir / REFERENCE} differs from the reference being installed"
    except (CheckpointError, DeployRootError, OSError) as exc:
        return str(exc)
    return None


def _criteria_ok(value: Any) -> bool:
    from aitune.accuracy import Criteria

    try:
        Criteria.from_dict(value)
    except (ValueError, TypeError, KeyError):
        return False
    return True


def stage(
    root: str | os.PathLike | None,
    checkpoint_dir: Path,
    reference: bytes,
    *,
    model: str,
    batch_size: int,
    class_key: str,
    device_class: dict[str, Any],
    tolerance: dict[str, float],
    factory: str | None,
    sweep_id: str | None = None,
    winner_key: str | None = None,
    candidate: str | None = None,
    criteria: dict[str, Any] | None = None,
    positional_names: list[str | None] | None = None,
    median_ms: float | None = None,
    shape: str = "",
    shapes: dict[str, Any] | None = None,
) -> tuple[Path, bool]:
    """Put a checkpoint in a version folder of its own (not current yet); returns (folder, is_new).

    The same checkpoint (same manifest SHA-256) installed before is not copied again when its
    installed copy passes every check: its folder is returned, to be verified and switched to like
    a new one. A copy that fails them (edited after install) is installed again as a new version
    (and removed, unless it is current). Every file is written whole (temporary file, fsync,
    rename); a shared ``device_class.json`` that is missing or damaged is written again.
    """
    root = check_writable(root)
    folder = batch_dir(root, model, class_key, batch_size, shape)
    if shapes is not None and not _shapes_ok(shapes):
        raise DeployRootError(f"the axes being installed for {model} are not a shapes record: {_short(shapes)}")
    sha = manifest_sha256(checkpoint_dir)
    manifest = verify_checkpoint(checkpoint_dir, sha)
    sample = _read_reference(reference, "the reference being installed")
    input_names = names_of_inputs(tuple(sample["args"]), dict(sample["kwargs"]), positional_names)
    try:
        with _locked(root, folder):
            class_file = folder.parent / DEVICE_CLASS
            try:
                _class_info(folder.parent)
                fine = True
            except DeployRootError:
                fine = False
            if not fine or json.loads(read_small(class_file)).get("key") != class_key:
                write_atomic(class_file, _class_record(class_key, device_class))
            try:
                now = current_version(folder)
            except DeployRootError:  # a damaged pointer: this install will replace it
                now = None
            for name in reversed(versions(folder)):
                if not name.endswith(sha[:12]):
                    continue
                problem = _installed_copy_problem(folder / name, sha, reference)
                if problem is None:
                    _refresh(folder / name, input_names, median_ms, shapes)
                    return folder / name, False
                log.warning("installed copy %s fails its checks (%s); installing it again", folder / name, problem)
                if name != now:
                    shutil.rmtree(folder / name, ignore_errors=True)
            existing = versions(folder)
            number = int(_VERSION.match(existing[-1]).group(1)) + 1 if existing else 1
            version = f"v{number:04d}-{sha[:12]}"
            install = Install(
                model=model, batch_size=int(batch_size), device_class_key=class_key, version=version, manifest_sha256=sha,
                factory=factory, backend=manifest.backend, input_shapes=input_shapes(tuple(sample["args"]), dict(sample["kwargs"])),
                tolerance=dict(tolerance), reference_sha256=hashlib.sha256(reference).hexdigest(), installed_at=time.time(),
                sweep_id=sweep_id, winner_key=winner_key, candidate=candidate, criteria=criteria,
                input_names=input_names, median_ms=median_ms, shape=shape, shapes=shapes,
            )
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".staging", dir=folder))
            try:
                shutil.copytree(checkpoint_dir, tmp / CHECKPOINT, symlinks=True)
                for path in sorted((tmp / CHECKPOINT).rglob("*")):
                    if path.is_file() and not path.is_symlink():
                        with open(path, "rb") as fh:
                            os.fsync(fh.fileno())
                write_atomic(tmp / REFERENCE, reference)
                write_atomic(tmp / INSTALL, (json.dumps(install.to_dict(), indent=2, sort_keys=True) + "\n").encode())
                for sub in [tmp / CHECKPOINT, *sorted(p for p in (tmp / CHECKPOINT).rglob("*") if p.is_dir()), tmp]:
                    fsync_dir(sub)
                os.replace(tmp, folder / version)
                fsync_dir(folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as exc:  # a full disk, a read-only file system: nothing half-written stays
        raise DeployRootError(f"{folder} can't be written: {exc.strerror or exc}") from None
    return folder / version, True


def load_version(version_dir: Path, device: torch.device | str, allow_factories=None, allow_backends=None):
    """Verify (manifest SHA-256 recorded at install, every checksum, the reference) and deploy one
    installed version. ``install.input_shapes`` and ``input_dtypes`` are those of the verified
    reference sample (install.json's shapes must agree with it).

    By default only the factory and plug-in backend named in ``install.json`` may be imported.
    """
    install = read_install(version_dir)
    ref = read_reference(version_dir, install)
    args, kwargs = tuple(ref["args"]), dict(ref["kwargs"])
    if input_shapes(args, kwargs) != install.input_shapes:
        raise DeployRootError(f"{version_dir / INSTALL}: input_shapes {_short(install.input_shapes)} are not those of "
                              f"its reference sample {input_shapes(args, kwargs)}")
    install.input_dtypes = input_dtypes(args, kwargs)
    install.row_check = read_row_check(version_dir, install.batch_size)
    install.positional_inputs = sum(isinstance(a, torch.Tensor) for a in args)
    paths = list(ref.get("paths") or [])
    install.outputs = [(paths[i] if i < len(paths) and isinstance(paths[i], str) else f"output[{i}]", list(t.shape),
                        str(t.dtype).removeprefix("torch.")) for i, t in enumerate(ref["outputs"])]
    factories, backends = candidate_allowlists(install.factory, install.backend)
    backend = load_checkpoint(
        version_dir / CHECKPOINT, device, manifest_sha256=install.manifest_sha256,
        allow_factories=factories if allow_factories is None else allow_factories,
        allow_backends=backends if allow_backends is None else allow_backends,
    )
    backend.deploy(device)
    return install, backend


def read_row_check(version_dir: Path, batch_size: int) -> RowCheck | None:
    """``batching.json`` (None where there is none); one that can't be read is a failed check, so
    batching stays off for it and the reason says why, while the version still serves."""
    file = version_dir / BATCHING
    if not file.exists():
        return None
    try:
        check = RowCheck.from_dict(json.loads(read_small(file, 1 << 16)))
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        return RowCheck(False, batch_size, f"{BATCHING} can't be read: {exc}")
    if check.batch_size != batch_size:
        return RowCheck(False, batch_size, f"{BATCHING} is for batch size {check.batch_size}, not {batch_size}")
    return check


def read_reference(version_dir: Path, install: Install) -> dict[str, Any]:
    """``reference.pt``, checked against the SHA-256 recorded at install."""
    try:
        data = read_small(version_dir / REFERENCE, 1 << 34)
    except OSError as exc:
        raise DeployRootError(f"{version_dir / REFERENCE}: can't be read: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != install.reference_sha256:
        raise DeployRootError(f"{version_dir / REFERENCE}: changed since it was installed")
    return _read_reference(data, version_dir / REFERENCE)


def verify_version(version_dir: Path, device: torch.device | str, latency_s: float = 0.1, threads: int = 1) -> Verified:
    """Load the installed version here and check it against its stored eager fp32 reference."""
    from aitune.accuracy import Criteria
    from aitune.check import Tolerance, compare_outputs
    from aitune.measure import MeasureConfig, measure
    from aitune.specs import Sample
    from aitune.torch.tree import flatten_tensors

    try:
        install, backend = load_version(version_dir, device)
        ref = read_reference(version_dir, install)
        sample = Sample(tuple(ref["args"]), dict(ref["kwargs"])).to(device)
        with torch.inference_mode():
            got = [t for _, t in flatten_tensors(sample(backend.infer))]
        criteria = Criteria.from_dict(install.criteria) if install.criteria else Criteria(Tolerance.from_dict(install.tolerance))
        expected = list(ref["outputs"])
        check = criteria.apply(compare_outputs(expected, got, criteria.tolerance), got, expected)
        if not check.ok:
            return Verified(False, check.max_abs_err, reason=f"{version_dir}: outputs differ from the reference: {check.reason}")
        m = measure(backend.infer, sample, device, MeasureConfig(budget_s=latency_s, min_iters=5, threads=threads))
        rows = None
        if install.batch_size > 1:
            def judge(want: list[torch.Tensor], seen: list[torch.Tensor]) -> str | None:
                seen = [t.cpu() for t in seen]
                verdict = criteria.apply(compare_outputs(want, seen, criteria.tolerance), seen, want)
                return None if verdict.ok else verdict.reason
            rows = check_rows(backend.infer, sample.args, sample.kwargs, expected, list(ref.get("paths") or []), judge)
        return Verified(True, check.max_abs_err, m.median_ms, row_check=rows)
    except CheckpointError as exc:
        return Verified(False, reason=f"checkpoint refused: {exc}")
    except DeployRootError as exc:
        return Verified(False, reason=str(exc))
    except Exception as exc:  # a version that can't run here is refused, whatever the reason
        return Verified(False, reason=f"{version_dir}: {type(exc).__name__}: {exc}")


def _root_of(version_dir: Path) -> Path:
    return version_dir.parent.parent.parent.parent


def activate(version_dir: Path, verified: Verified, was_new: bool) -> None:
    """After verification: switch ``current`` to a verified version, or drop a new one that failed."""
    folder = version_dir.parent
    with _locked(_root_of(version_dir), folder, create=False):
        if verified.ok:
            if verified.row_check is not None:
                write_atomic(version_dir / BATCHING, (json.dumps(verified.row_check.to_dict(), sort_keys=True) + "\n").encode())
            _switch(folder, version_dir.name)
        elif was_new and _current_or_none(folder) != version_dir.name:
            shutil.rmtree(version_dir, ignore_errors=True)


def _current_or_none(folder: Path) -> str | None:
    try:
        return current_version(folder)
    except DeployRootError:
        return None


def switch_back(version_dir: Path, previous: str | None) -> None:
    """Undo an activation: ``current`` back to ``previous`` (or removed where there was none)."""
    folder = version_dir.parent
    with _locked(_root_of(version_dir), folder, create=False):
        if previous:
            _switch(folder, previous)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / CURRENT)


def rollback(root: str | os.PathLike | None, model: str, class_key: str, batch_size: int,
             device: torch.device | str, latency_s: float = 0.1, threads: int = 1,
             shape: str = "") -> tuple[str | None, str | None, Verified]:
    """Switch ``current`` back to the version installed before it, verified first.

    Returns (from version, to version, verification); ``current`` is unchanged unless it passed.
    """
    root = resolve_root(root)
    folder = batch_dir(root, model, class_key, batch_size, shape)
    check_no_links(root, folder)
    if not folder.is_dir():
        return None, None, Verified(False, reason=f"nothing installed in {folder}")
    try:
        with _locked(root, folder, create=False):
            now = current_version(folder)
            older = [v for v in versions(folder) if now is None or int(_VERSION.match(v).group(1)) < int(_VERSION.match(now).group(1))]
            if not older:
                return now, None, Verified(False, reason=f"no version before {now or 'the current one'} in {folder}")
            target = older[-1]
            verified = verify_version(folder / target, device, latency_s, threads)
            if verified.ok:
                _switch(folder, target)
            return now, target, verified
    except OSError as exc:  # a read-only or full file system
        raise DeployRootError(f"{folder} can't be written: {exc.strerror or exc}") from None


@dataclass
class Live:
    model: str
    batch_size: int
    class_key: str
    device_name: str | None
    version: str
    folder: Path
    shape: str = ""


def live(root: str | os.PathLike | None, model: str | None = None) -> list[Live]:
    """What is current under ``root``: one entry per (model, device class, batch size).

    Links anywhere below the root, damaged shared files and bad pointers are refused
    (DeployRootError, one line naming the file)."""
    root = resolve_root(root)
    out = []
    if model is not None:
        check_model_name(model)
        models = [root / model]
    else:
        models = sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
    for mdir in models:
        check_no_links(root, mdir)
        if not mdir.is_dir():
            continue
        for cdir in sorted(mdir.iterdir()):
            check_no_links(root, cdir)
            if not cdir.is_dir():
                continue
            batches = sorted(p for p in cdir.iterdir() if _BATCH.match(p.name))
            if not batches:
                continue
            name, key = _class_info(cdir)
            for bdir in batches:
                check_no_links(root, bdir)
                version = current_version(bdir)
                if version:
                    found = _BATCH.match(bdir.name)
                    out.append(Live(mdir.name, int(found.group(1)), key, name, version, bdir / version,
                                    found.group(2).lstrip("-").replace("-", ",")))
    return out


def _class_info(class_dir: Path) -> tuple[str | None, str]:
    """(device name, full class key) from ``device_class.json``; DeployRootError if it is missing or damaged."""
    file = class_dir / DEVICE_CLASS
    try:
        data = json.loads(read_small(file))
        key, klass = data["key"], data["device_class"]
        if not (isinstance(key, str) and _HEX64.match(key) and isinstance(klass, dict)):
            raise ValueError("no 64-hex key and device_class")
        if class_dir_name(key) != class_dir.name:
            raise ValueError(f"its key is for folder {class_dir_name(key)}")
        name = klass.get("device_name")
        return (name if isinstance(name, str) else None), key
    except FileNotFoundError:
        raise DeployRootError(f"{file}: missing; deploy again to write it") from None
    except DeployRootError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not the JSON this deploy root writes" \
            if not isinstance(exc, ValueError) or isinstance(exc, json.JSONDecodeError) else str(exc)
        raise DeployRootError(f"{file}: damaged ({why}); deploy again to rewrite it") from None


def device_classes(root: str | os.PathLike | None, model: str) -> dict[str, str | None]:
    """The device classes ``model`` has a current version for: key prefix -> device name."""
    return {entry.class_key[:16]: entry.device_name for entry in live(root, model)}
