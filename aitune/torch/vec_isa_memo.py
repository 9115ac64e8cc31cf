"""Inductor's CPU vector-ISA probe, answered once per machine and toolchain, not once per process.

Before its first CPU kernel, every process that runs ``torch.compile`` or AOTInductor asks which
SIMD instruction sets (AVX-512 VNNI, AVX-512, AVX2, ...) this CPU claims and its C++ compiler can
build for. Inductor answers the second half by compiling a tiny library per set and loading each
in a child Python: about 0.7 s on a 2-core machine. A sweep's workers are fresh processes, so each
of them paid it again, and for a small model that was half of its first compile.

:func:`remember_vec_isa` keeps the probe's answer in a file named by what decides it (this host,
this torch, the compiler binary) and, in a later process, fills Inductor's own memo of the answer
without the children, but only when the sets this CPU claims are exactly the sets the probe passed
then: a set that failed its probe once is probed again rather than assumed. Inductor's config is
left as it was (its compile caches are keyed by it), and a user who decided the question with
``TORCHINDUCTOR_VEC_ISA_OK`` is not second-guessed.

Anything unexpected (a torch without these functions, a file that does not parse, a folder that
can't be written) costs only the speed-up: Inductor then probes as it always did.

The folder is ``$AITUNE_ISA_MEMO``, else ``$XDG_CACHE_HOME/aitune/inductor-isa``, else
``~/.cache/aitune/inductor-isa``; ``AITUNE_ISA_MEMO=off`` keeps nothing and probes every time.
Deleting it at any time is safe.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Mapping

from aitune.cache_folders import cache_folder
from aitune.canonical import sha256_of

log = logging.getLogger(__name__)

ENV = "AITUNE_ISA_MEMO"
#: a memo file is a few dozen bytes; anything much larger is not one
MAX_BYTES = 4096

#: what :func:`remember_vec_isa` did
TURNED_OFF, KNOWN, REUSED, PROBED, UNAVAILABLE = "off", "known", "reused", "probed", "unavailable"


def memo_root(environ: Mapping[str, str] = os.environ) -> Path | None:
    return cache_folder(ENV, "inductor-isa", environ)


def remember_vec_isa(environ: Mapping[str, str] = os.environ) -> str:
    """Make Inductor's answer to "which vector ISAs?" known in this process, from the machine's
    memo where it holds, else by Inductor's own probe (whose answer is then kept). Returns what
    it did: ``reused``, ``probed``, ``known`` (this process knew already, or the user set
    ``TORCHINDUCTOR_VEC_ISA_OK``), ``off`` or ``unavailable`` (not an x86 CPU, whose sets Inductor
    does not probe, or a torch laid out otherwise)."""
    root = memo_root(environ)
    if root is None:
        return TURNED_OFF
    try:
        from torch._inductor import config, cpu_vec_isa

        listing = cpu_vec_isa.valid_vec_isa_list
        if config.cpp.vec_isa_ok is not None or listing.cache_info().currsize:
            return KNOWN
        if platform.machine() not in ("x86_64", "AMD64"):
            return UNAVAILABLE
        claimed = _claimed(cpu_vec_isa)
        path = root / f"{_memo_key()}.json"
    except Exception as exc:  # another torch: nothing here to fill
        log.debug("vector-ISA memo unavailable: %s", exc)
        return UNAVAILABLE
    if _read(path) == claimed:
        try:
            if _fill(config, listing) == claimed:
                return REUSED  # Inductor's memo now holds the list the probe passed on this machine
        except Exception as exc:
            log.debug("vector-ISA memo not usable: %s", exc)
        _forget(cpu_vec_isa)
    try:  # none kept, or what the CPU claims is not what passed then: Inductor's own probe
        probed = [str(isa) for isa in listing()]
    except Exception as exc:
        log.debug("vector-ISA probe failed: %s", exc)
        _forget(cpu_vec_isa)
        return UNAVAILABLE
    _write(path, probed)
    return PROBED


def _claimed(cpu_vec_isa) -> list[str]:
    """The sets this CPU claims, in Inductor's order, as its listing filters them before it
    probes each (nothing compiled or called here)."""
    flags = cpu_vec_isa.x86_isa_checker()
    return [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]


def _fill(config, listing) -> list[str]:
    """Inductor's listing made with the base probe of each set skipped (the config switched back
    at once, so nothing compiled sees it); what a set adds on top (bf16, VNNI) is still checked
    by Inductor as usual."""
    config.cpp.vec_isa_ok = True
    try:
        listing.cache_clear()
        return [str(isa) for isa in listing()]
    finally:
        config.cpp.vec_isa_ok = None


def _forget(cpu_vec_isa) -> None:
    """Drop every answer Inductor memoised while the probe was skipped, so that it probes afresh."""
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    for isa in cpu_vec_isa.supported_vec_isa_list:
        for cls in type(isa).__mro__:
            for attr in cls.__dict__.values():
                if callable(getattr(attr, "cache_clear", None)):
                    attr.cache_clear()


def _memo_key() -> str:
    """What decides the probe's answer: the host (a shared home folder is not a shared CPU),
    this torch, this Python and the compiler binary Inductor would call."""
    import torch
    from torch._inductor.cpp_builder import get_cpp_compiler

    compiler = get_cpp_compiler()
    binary = shutil.which(compiler) or compiler
    real = os.path.realpath(binary)
    st = os.stat(real)
    return sha256_of({"format": 1, "host": platform.node(), "machine": platform.machine(),
                      "torch": torch.__version__, "torch_dir": os.path.dirname(torch.__file__),
                      "python": sys.executable, "compiler": [compiler, real, st.st_size, st.st_mtime_ns]})[:32]


def _read(path: Path) -> list[str] | None:
    """The recorded list, or None where there is none or it is not one (then removed)."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes")
        data = json.loads(path.read_text())
        isas = data["isas"]
        if not isinstance(isas, list) or not all(isinstance(i, str) for i in isas):
            raise ValueError("'isas' is not a list of names")
        return isas
    except FileNotFoundError:
        return None
    except Exception as exc:
        log.warning("ignoring the vector-ISA memo %s (%s); probing again", path, exc)
        try:
            path.unlink()
        except OSError:
            pass
        return None


def _write(path: Path, isas: list[str]) -> None:
    """Written whole or not at all: a temporary file renamed into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".isa-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"isas": isas}, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.debug("vector-ISA memo not kept at %s: %s", path, exc)
