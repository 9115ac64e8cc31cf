"""What a sweep settles before Ray starts: the store it writes and the models it tunes.

A run refused at this stage (a bad store, a model that does not load, a cluster that can't be
reached) leaves no store behind that it made itself.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.planning.candidates import identify_models
from orchestrator.planning.shape_plans import ShapePlan, settle_shapes
from orchestrator.spec.schema import SweepSpec
from orchestrator.store import DB_NAME, ResultStore, SqliteStore


def open_store(root: str | Path) -> SqliteStore:
    return SqliteStore(Path(root))


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what creating it would make), if any."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


@dataclass
class Prepared:
    """An open store and the models' identities: (weights fingerprint, architecture key) by name."""

    store: ResultStore
    identities: dict[str, tuple[str, str]]
    #: whether the sweep opened the store (and so closes it); False for a store it was handed
    own_store: bool
    root: Path
    new_root: Path | None = None
    new_db: bool = False
    #: each model whose axes vary: where they lie, the outputs that follow them, whether padding is safe
    shapes: dict[str, ShapePlan] = field(default_factory=dict)

    def close(self) -> None:
        if self.own_store:
            self.store.close()

    def undo(self) -> None:
        """Close the store and remove what opening it created (a refused run)."""
        if not self.own_store:
            return
        self.store.close()
        if self.new_root is not None:
            shutil.rmtree(self.new_root, ignore_errors=True)
        elif self.new_db:
            for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
                (self.root / name).unlink(missing_ok=True)


def prepare(spec: SweepSpec, store_root: str | Path | None, store: ResultStore | None) -> Prepared:
    """Open (or take) the store, then load every model once to identify it."""
    root = Path(store_root or spec.store)
    if store is not None:
        prepared = Prepared(store, {}, own_store=False, root=root)
    else:
        new_root, new_db = _first_missing(root), not (root / DB_NAME).exists()
        prepared = Prepared(open_store(root), {}, own_store=True, root=root, new_root=new_root, new_db=new_db)
    try:
        prepared.identities = identify_models(spec)
        prepared.shapes = settle_shapes(spec)
    except BaseException:
        prepared.undo()
        raise
    return prepared
