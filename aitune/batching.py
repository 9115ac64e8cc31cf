"""Combining requests into the tuned batch sizes: is it correct for a model, and how to split.

Dynamic batching (``orchestrator serve``) runs the rows of several requests as one call to a
winner tuned for a larger batch. That is only correct when the model treats the rows of a batch
independently, which a normalisation over the batch axis (``BatchNorm`` in training mode, a
``softmax(dim=0)``) does not. :func:`check_rows` decides it for one installed version, on the
device, against its own stored reference: the batch with every other row replaced by a copy of
row 0 (which is also how a short batch is padded) and the batch in reverse order must give row 0's
and each row's reference outputs within the install's criteria. The outcome is kept with the
install (``batching.json``), and batching is on only where every tuned batch size passed.

:func:`plan` splits a number of rows into tuned batch sizes using the sweep's latency per size
(kept with each install as ``median_ms``): the cheapest sequence of calls that covers the rows,
the last one padded when padding up is cheaper than splitting further. The plan is a pure
function of the stored figures, so ``serve`` and ``deployments`` show the same one.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

#: the names batching.json may hold, with their types
_ROW_CHECK_FIELDS = {"independent": bool, "batch_size": int, "reason": (str, type(None))}


@dataclass(frozen=True)
class RowCheck:
    """Whether one installed version treats the rows of its batch independently."""

    independent: bool
    batch_size: int
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "RowCheck":
        """Read back with checks (``batching.json`` is a file on disk: trusted for nothing)."""
        if not isinstance(data, dict) or set(data) != set(_ROW_CHECK_FIELDS):
            raise ValueError(f"not a row check: expected the fields {', '.join(_ROW_CHECK_FIELDS)}")
        for name, kind in _ROW_CHECK_FIELDS.items():
            value = data[name]
            if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
                raise ValueError(f"row check: {name} is {value!r}")
        return cls(**data)


def _rows(value: Any, batch: int, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _NotBatched(f"{where} is not a tensor")
    if value.dim() == 0 or value.shape[0] != batch:
        raise _NotBatched(f"{where} has shape {list(value.shape)}, not {batch} rows on axis 0")
    return value


class _NotBatched(ValueError):
    pass


def _map_inputs(args: tuple, kwargs: dict, fn: Callable[[torch.Tensor], torch.Tensor], batch: int):
    new_args = tuple(fn(_rows(a, batch, f"input {i}")) for i, a in enumerate(args))
    new_kwargs = {k: fn(_rows(v, batch, f"input {k!r}")) for k, v in kwargs.items()}
    return new_args, new_kwargs


def check_rows(infer: Callable, args: tuple, kwargs: dict, expected: list[torch.Tensor], paths: list[str],
               judge: Callable[[list[torch.Tensor], list[torch.Tensor]], str | None]) -> RowCheck:
    """Run ``infer`` on the reference sample with rows copied and reversed; ``expected`` are the
    reference outputs (flattened, paths ``paths``) and ``judge(expected, got)`` says why two lists
    of outputs differ beyond the install's criteria (None: they agree)."""
    from aitune.torch.tree import flatten_tensors

    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    batch = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0
    if batch < 2:
        return RowCheck(False, max(batch, 1), "one row per call: nothing to combine")
    try:
        for i, out in enumerate(expected):
            _rows(out, batch, f"output {paths[i] if i < len(paths) else i}")
        copied = _map_inputs(args, kwargs, lambda t: t[:1].expand_as(t).clone(), batch)
        reversed_ = _map_inputs(args, kwargs, lambda t: t.flip(0), batch)
    except _NotBatched as exc:
        return RowCheck(False, batch, f"{exc}: rows can't be combined")
    with torch.inference_mode():
        got_copied = [t for _, t in flatten_tensors(infer(*copied[0], **copied[1]))]
        got_reversed = [t for _, t in flatten_tensors(infer(*reversed_[0], **reversed_[1]))]
    problem = judge([t[:1] for t in expected], [t[:1] for t in got_copied])
    if problem:
        return RowCheck(False, batch, f"row 0's outputs change when the other rows change ({problem}): "
                                      "the model mixes the rows of a batch")
    problem = judge([t.flip(0) for t in expected], got_reversed)
    if problem:
        return RowCheck(False, batch, f"outputs change when the rows are reordered ({problem}): "
                                      "the model mixes the rows of a batch")
    return RowCheck(True, batch)


def plan(latency_ms: dict[int, float], rows: int) -> list[int]:
    """The tuned batch sizes to run ``rows`` rows as, cheapest by ``latency_ms`` (size -> the
    sweep's median); the last call is padded when its size exceeds the rows left. Ties: fewer
    calls, then larger sizes first."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if not latency_ms:
        raise ValueError("no tuned batch sizes")
    table = tuple(sorted((int(b), float(ms)) for b, ms in latency_ms.items()))
    return list(_plan(table, rows))


@functools.lru_cache(maxsize=4096)
def _plan(table: tuple[tuple[int, float], ...], rows: int) -> tuple[int, ...]:
    largest = table[-1][0]
    if rows > 2 * largest:  # whole calls of the size that is cheapest per row, then the rest planned
        best = min(table, key=lambda t: (t[1] / t[0], -t[0]))[0]
        whole = (rows - largest) // best
        return (best,) * whole + _plan(table, rows - whole * best)
    cost: list[tuple[float, int, tuple[int, ...]]] = [(0.0, 0, ())]
    for n in range(1, rows + 1):
        options = []
        for size, ms in table:
            before = cost[max(0, n - size)]
            options.append((before[0] + ms, before[1] + 1, tuple(sorted(before[2] + (size,), reverse=True))))
        cost.append(min(options, key=lambda o: (round(o[0], 9), o[1], tuple(-s for s in o[2]))))
    return cost[rows][2]




@dataclass(frozen=True)
class Batching:
    """Whether a model's current installs on one device class may combine requests, and how."""

    enabled: bool
    #: why not, when not enabled
    reason: str | None
    #: tuned batch size -> the sweep's median latency (ms) of its winner
    latency_ms: dict[int, float]
    #: the shape of one row of each tensor input (positional, then keyword by name) and its dtype
    row_shapes: list[list[int]]
    dtypes: list[str]

    @property
    def max_batch(self) -> int:
        return max(self.latency_ms, default=1)

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "reason": self.reason, "batch_sizes": sorted(self.latency_ms),
                "latency_ms": {str(b): ms for b, ms in sorted(self.latency_ms.items())},
                "plans": {str(n): plan(self.latency_ms, n) for n in range(1, self.max_batch + 1)} if self.enabled else {}}


def batching_for(installs: list[Any]) -> Batching:
    """From a model's current installs (aitune.deploy_root.Install, with ``row_check`` read back):
    on only when more than one row can be combined and every tuned size passed its row check."""
    ordered = sorted(installs, key=lambda i: i.batch_size)
    latency = {i.batch_size: float(i.median_ms) for i in ordered if i.median_ms is not None}
    first = ordered[0] if ordered else None
    rows = [s[1:] for s in first.input_shapes] if first else []
    dtypes = list(first.input_dtypes or []) if first else []

    def off(reason: str) -> Batching:
        return Batching(False, reason, latency, rows, dtypes)

    if not ordered:
        return off("nothing installed")
    shapes = {getattr(i, "shape", "") for i in ordered}
    if len(shapes) > 1:
        return off("tuned at several lengths (buckets): requests are combined within each bucket, padded up to it")
    if any(".." in s for s in shapes):
        return off("a dynamic-shape artifact: each request runs alone at its own length")
    if ordered[-1].batch_size < 2:
        return off("only batch size 1 was tuned: nothing to combine")
    for install in ordered:
        if install.median_ms is None:
            return off(f"b{install.batch_size} ({install.version}) has no latency from its sweep to plan batches by "
                       "(installed before it was kept; deploy again)")
        if any(not s or s[0] != install.batch_size for s in install.input_shapes):
            return off(f"b{install.batch_size}: not every input has the batch on axis 0 ({install.input_shapes})")
        if [s[1:] for s in install.input_shapes] != rows or list(install.input_dtypes or []) != dtypes:
            return off(f"b{install.batch_size}'s inputs differ from b{first.batch_size}'s beyond the batch axis")
        if install.batch_size > 1:
            check = install.row_check
            if check is None:
                return off(f"b{install.batch_size} ({install.version}) was installed before rows were checked; deploy again")
            if not check.independent:
                return off(f"b{install.batch_size}: {check.reason}")
    return Batching(True, None, latency, rows, dtypes)


def batching_in_root(root: Any, model: str, class_key: str) -> Batching:
    """The batching a model's current installs of one device class allow, read from the deploy
    root's files alone (no checkpoint loaded): what ``deployments`` shows."""
    from aitune import deploy_root as layout

    installs = []
    for entry in layout.live(root, model):
        if entry.class_key == class_key:
            install = layout.read_install(entry.folder)
            install.row_check = layout.read_row_check(entry.folder, install.batch_size)
            installs.append(install)
    return batching_for(installs)


def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[0] == size:
        return t
    return torch.cat([t, t[:1].expand(size - t.shape[0], *t.shape[1:])])


def rows_of(args: tuple, kwargs: dict) -> int:
    """The rows of one call: its first input's batch axis."""
    return int(next(iter([*args, *kwargs.values()])).shape[0])


def run_rows(call: Callable, requests: list[tuple[tuple, dict]], sizes: list[int]) -> list[list[tuple[str, torch.Tensor]]]:
    """Run several requests' rows as the tuned batch ``sizes`` (:func:`plan` of their rows) and split
    the outputs back: one list of (path, tensor) per request. The inputs agree beyond the batch axis."""
    from aitune.torch.tree import flatten_tensors

    counts = [rows_of(*r) for r in requests]
    total = sum(counts)
    args = tuple(torch.cat([r[0][i] for r in requests]) for i in range(len(requests[0][0])))
    kwargs = {k: torch.cat([r[1][k] for r in requests]) for k in requests[0][1]}
    parts: list[list[tuple[str, torch.Tensor]]] = []
    start = 0
    for size in sizes:
        real = min(size, total - start)

        def cut(t: torch.Tensor, s: int = start, n: int = real, size: int = size) -> torch.Tensor:
            return _pad(t[s:s + n], size)

        flat = flatten_tensors(call(*map(cut, args), **{k: cut(v) for k, v in kwargs.items()}))
        parts.append([(p, t[:real]) for p, t in flat])
        start += real
    paths = [p for p, _ in parts[0]]
    joined = [torch.cat([part[i][1] for part in parts]) if len(parts) > 1 else parts[0][i][1] for i in range(len(paths))]
    answers, offset = [], 0
    for count in counts:
        answers.append([(p, t[offset:offset + count]) for p, t in zip(paths, joined)])
        offset += count
    return answers
