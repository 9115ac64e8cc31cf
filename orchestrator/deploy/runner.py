"""How a serving replica runs a request: combined with others into the tuned batch sizes (where
the model's installs passed their row check and batching is not turned off), or alone.

:class:`Runner` holds one :class:`orchestrator.deploy.batcher.ModelBatcher` per batched model and
the replica's inference thread; it reads the replica's current models on every request, so a
rollover (one reference swap in ``models``) takes effect at the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from aitune.batching import plan, rows_of, run_rows

log = logging.getLogger(__name__)
SERVING_FILE = "serving.json"


def _row_problem(batching, args: tuple, kwargs: dict) -> str | None:
    """Why a request can't join a batch: its inputs beyond the batch axis are not the tuned ones."""
    tensors = [*args, *(kwargs[k] for k in sorted(kwargs))]
    rows = [list(t.shape[1:]) for t in tensors]
    dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
    counts = {int(t.shape[0]) if t.dim() else 0 for t in tensors}
    tuned = "; ".join("x".join(["N", *map(str, r)]) for r in batching.row_shapes)
    if rows != batching.row_shapes or len(counts) != 1 or 0 in counts:
        got = "; ".join("x".join(map(str, t.shape)) for t in tensors)
        return f"input shape {got} was not tuned; tuned shapes: {tuned} (N: any batch, run as {sorted(batching.latency_ms)})"
    if dtypes != batching.dtypes:
        return f"input dtypes {', '.join(dtypes)} were not tuned; tuned dtypes: {', '.join(batching.dtypes)}"
    return None


@dataclass(frozen=True)
class BatchingSettings:
    """How a server batches: ``off`` for all models, and each model's queueing delay and tuned batch
    sizes kept (given here, they win over the model's ``serving.json``)."""

    off: bool = False
    max_queue_delay_ms: tuple[tuple[str, float], ...] = ()
    batch_sizes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def delay_ms(self, model: str) -> float | None:
        """The delay given for ``model`` (or for every model: "*"); None where none was given."""
        table = dict(self.max_queue_delay_ms)
        found = table.get(model, table.get("*"))
        return None if found is None else float(found)

    def sizes(self, model: str) -> tuple[int, ...] | None:
        return dict(self.batch_sizes).get(model)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "BatchingSettings":
        data = data or {}
        sizes = tuple(sorted((m, tuple(sorted(int(b) for b in v))) for m, v in (data.get("batch_sizes") or {}).items()))
        return cls(bool(data.get("off", False)), tuple(sorted((data.get("max_queue_delay_ms") or {}).items())), sizes)


def kept(batching, sizes) -> Any:
    """``batching`` (aitune.batching.Batching) with only the tuned ``sizes`` kept; off where that
    leaves nothing to combine."""
    from dataclasses import replace

    latency = {b: ms for b, ms in batching.latency_ms.items() if b in set(sizes)}
    if not batching.enabled or latency == batching.latency_ms:
        return batching
    if not latency or max(latency) < 2:
        return replace(batching, enabled=False, latency_ms=latency,
                       reason=f"the serving settings keep batch sizes {sorted(sizes)} only: nothing to combine")
    return replace(batching, latency_ms=latency)


class Runner:
    """The batching settings, the batchers and the inference thread of one replica."""

    def __init__(self, models: dict[str, Any], device, settings: BatchingSettings, threads: int,
                 relative: Callable[[str], str] = str, serving: Callable[[str, Any], tuple] | None = None) -> None:
        """``serving(model, tuned)``: (aitune.serving_config.ServingConfig or None, why it was ignored or None)."""
        import torch

        self.models, self.device, self.settings, self.relative = models, device, settings, relative
        self.serving = serving or (lambda model, tuned: (None, None))
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="aitune-infer", initializer=torch.set_num_threads,
                                           initargs=(threads,))
        self._busy = 0  # calls handed to the inference thread and not yet back
        self.inflight = 0  # protocol requests on this replica, from arrival to answer
        self._batchers: dict[str, Any] = {}
        self._in_force: dict[str, tuple[Any, Any, dict[str, Any]]] = {}  # model -> (TunedModel, Batching, in force)
        self._noted: dict[str, str] = {}  # model -> the last serving.json problem logged

    def rolled_over(self, model: str) -> None:
        """A new version of ``model`` is current: its batch's size limit follows it."""
        batcher = self._batchers.get(model)
        if batcher is not None:
            force = self.batching_in_force(model)
            batcher.max_rows, batcher.delay_s = force["max_batch"], force["max_queue_delay_ms"] / 1000.0
        for key, bucket in self._batchers.items():  # each bucket's queue, where requests are combined per bucket
            if key.startswith(f"{model} "):
                bucket.max_rows = max(1, self.models[model].batching_at(key.removeprefix(f"{model} ")).max_batch)
                bucket.delay_s = self.batching_in_force(model)["max_queue_delay_ms"] / 1000.0

    def reconfigure(self, settings: BatchingSettings) -> None:
        """New batching settings: worked out again per model; a model's queue keeps its requests and
        takes the new size limit and delay (or stops taking requests where batching is now off)."""
        self.settings = settings
        self._in_force.clear()
        for model in list(self._batchers):
            if model in self.models and self.batching_in_force(model)["enabled"]:
                self.rolled_over(model)
            else:
                del self._batchers[model]  # its queue drains on its own; new requests run alone

    def counters(self) -> dict[str, dict[str, int]]:
        return {m: {"batches": b.batches, "rows": b.rows} for m, b in self._batchers.items()}

    def batching_in_force(self, model: str) -> dict[str, Any]:
        """The batching a model gets on this replica: on/off with the reason, the delay, the plans
        (worked out once per loaded version: every request asks)."""
        return self._known(model)[2]

    def batching_of(self, model: str):
        """The model's aitune.batching.Batching with only the batch sizes kept by the serving settings."""
        return self._known(model)[1]

    def _known(self, model: str) -> tuple[Any, Any, dict[str, Any]]:
        tuned = self.models[model]
        known = self._in_force.get(model)
        if known is None or known[0] is not tuned:
            known = (tuned, *self._work_out(model, tuned))
            self._in_force[model] = known
        return known

    def _work_out(self, model: str, tuned) -> tuple[Any, dict[str, Any]]:
        """The model's own batching (aitune.batching.Batching), narrowed by the serving settings (the
        command line's, else its serving.json's) and turned off where this server says so."""
        from orchestrator.deploy.batcher import DEFAULT_MAX_QUEUE_DELAY_MS

        given_sizes, given_delay = self.settings.sizes(model), self.settings.delay_ms(model)
        config, note = (None, None) if given_sizes is not None and given_delay is not None else self.serving(model, tuned)
        if note and self._noted.get(model) != note:
            self._noted[model] = note
            log.warning("%s", self.relative(note))
        sizes = given_sizes if given_sizes is not None else (config.batch_sizes if config else None)
        batching = kept(tuned.batching, sizes) if sizes else tuned.batching
        delay = given_delay if given_delay is not None else (
            config.max_queue_delay_ms if config else DEFAULT_MAX_QUEUE_DELAY_MS)
        force = batching.to_dict()
        if force["enabled"] and self.settings.off:
            force.update(enabled=False, reason="turned off for this server (--no-batching)", plans={})
        force.update(max_batch=batching.max_batch if force["enabled"] else 1, max_queue_delay_ms=float(delay),
                     settings_from="the server's arguments" if given_sizes is not None or given_delay is not None
                     else SERVING_FILE if config else "defaults",
                     serving_json=self.relative(note) if note else ("used" if config else None))
        shapes = sorted({i.shape for i in tuned.installs.values()})
        if len(shapes) > 1 and not self.settings.off:  # combined within each bucket instead
            force["buckets"] = {s: {k: v for k, v in tuned.batching_at(s).to_dict().items() if k != "plans"} for s in shapes}
        return batching, force

    async def call(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn`` where models run: on the one inference thread, so that no backend is entered
        twice at once (a CUDA graph's static buffers); or right here on the event loop when that
        thread is idle and no other request is on the replica (a lone client skips the thread hop,
        about 0.2 ms; nothing else can start a model while the loop is busy with this one)."""
        if self._busy == 0 and self.inflight <= 1:
            return fn(*args)
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self._busy -= 1

    @contextlib.contextmanager
    def arriving(self, model: str, version: str | None):
        """Counts a request on the replica, and towards its model's batch while it is read (see batcher)."""
        batcher = self._batcher(model) if version is None else None
        self.inflight += 1
        try:
            with batcher.arriving() if batcher is not None else contextlib.nullcontext():
                yield
        finally:
            self.inflight -= 1

    def _batcher(self, model: str):
        from orchestrator.deploy.batcher import ModelBatcher

        force = self.batching_in_force(model)
        if not force["enabled"]:
            return None
        batcher = self._batchers.get(model)
        if batcher is None:
            batcher = ModelBatcher(lambda items: self._run_batch(model, items), force["max_batch"],
                                   force["max_queue_delay_ms"], self.call)
            self._batchers[model] = batcher
        return batcher

    def _run_batch(self, model: str, items: list) -> list:
        """On the inference thread: the queued requests' rows as the current winners' tuned sizes."""
        import torch


        tuned = self.models[model]
        batching = self.batching_of(model)
        with torch.inference_mode():
            if batching.enabled:
                sizes = plan(batching.latency_ms, sum(rows_of(a, k) for a, k in items))
                versions = ",".join(sorted({tuned.versions[b] for b in sizes}))
                return [(flat, versions) for flat in run_rows(tuned, items, sizes)]
            return [self._run_one(tuned, args, kwargs) for args, kwargs in items]  # rolled over to an unbatched one

    async def _in_bucket(self, model: str, tuned, args: tuple, kwargs: dict):
        """A request to a model tuned at buckets, padded up to its bucket and combined there with the
        others queued for it (sliced back after); None where it runs alone instead (no batching in
        that bucket, or no bucket answers it: the plain call says why)."""
        from aitune.loader import UntunedShape
        from orchestrator.deploy.batcher import ModelBatcher
        from orchestrator.deploy.http_errors import Refused

        try:
            found = tuned.to_bucket(args, kwargs)
        except UntunedShape as exc:
            raise Refused(400, str(exc)) from None
        if found is None or self.settings.off:
            return None
        (args, kwargs), lengths, shape = found
        batching = tuned.batching_at(shape)
        if not batching.enabled or _row_problem(batching, args, kwargs):
            return None
        batcher = self._batchers.get(f"{model} {shape}")
        if batcher is None:
            batcher = self._batchers[f"{model} {shape}"] = ModelBatcher(
                lambda items: self._run_bucket(model, shape, items), batching.max_batch,
                self.batching_in_force(model)["max_queue_delay_ms"], self.call)
        with batcher.arriving():
            answer = await batcher.submit(((args, kwargs), lengths), rows_of(args, kwargs))
        if isinstance(answer, Refused):
            raise answer
        return answer

    def _run_bucket(self, model: str, shape: str, items: list) -> list:
        """On the inference thread: one bucket's queued requests (padded up to it) as its tuned sizes,
        each request's outputs sliced back to its own lengths."""
        import torch

        tuned = self.models[model]
        batching = tuned.batching_at(shape)
        with torch.inference_mode():
            if not batching.enabled:  # rolled over to a version that can't combine rows
                alone = [self._run_one(tuned, *call) for call, _ in items]
                return [a if not isinstance(a, tuple) else (tuned.shapes.cut_flat(a[0], lengths), a[1])
                        for a, (_, lengths) in zip(alone, items)]
            sizes = plan(batching.latency_ms, sum(rows_of(*call) for call, _ in items))
            answered = run_rows(tuned, [call for call, _ in items], sizes)
        versions = ",".join(sorted({tuned.version_at(b, shape) or "?" for b in sizes}))
        return [(tuned.shapes.cut_flat(flat, lengths), versions) for flat, (_, lengths) in zip(answered, items)]

    def _run_one(self, tuned, args: tuple, kwargs: dict):
        from aitune.loader import UntunedShape
        from aitune.torch.tree import flatten_tensors
        from orchestrator.deploy.http_errors import Refused

        try:
            out = tuned(*args, **kwargs)
        except UntunedShape as exc:
            return Refused(400, str(exc))
        except Exception as exc:  # the model failed on this request: a 500 naming it, the server stays up
            log.warning("%s failed on a request: %s: %s", tuned.model, type(exc).__name__, exc)
            first = str(exc).splitlines()[0] if str(exc) else ""
            return Refused(500, f"{tuned.model} failed: {type(exc).__name__}: {self.relative(first)}")
        install = tuned.winner_for(*args, **kwargs)
        return flatten_tensors(out), install.version if install else None

    def _alone(self, tuned, args: tuple, kwargs: dict):
        import torch

        with torch.inference_mode():
            return self._run_one(tuned, args, kwargs)

    async def run(self, model: str, version: str | None, args: tuple, kwargs: dict):
        """One request's outputs ([(path, tensor)]) and the version(s) that answered; raises Refused.
        Every call runs on the replica's one inference thread, batched or not: a backend that keeps
        state between calls (CUDA graphs' static buffers) is never entered twice at once."""
        from orchestrator.deploy.http_errors import Refused

        args = tuple(a.to(self.device) for a in args)
        kwargs = {k: v.to(self.device) for k, v in kwargs.items()}
        tuned = self.models[model]
        batcher = self._batcher(model) if version is None else None
        if batcher is None and version is None and tuned.shapes is not None:
            answer = await self._in_bucket(model, tuned, args, kwargs)
            if answer is not None:
                return answer
        if batcher is not None:
            problem = _row_problem(tuned.batching, args, kwargs)
            if problem:
                raise Refused(400, f"{model}: {problem}")
            answer = await batcher.submit((args, kwargs), rows_of(args, kwargs))
        else:
            if version is not None:
                install = tuned.winner_for(*args, **kwargs)
                if install is None or install.version != version:
                    shapes = next(("; ".join("x".join(map(str, s)) for s in i.input_shapes)
                                   for i in tuned.installs.values() if i.version == version), "")
                    raise Refused(400, f"{model} version {version} takes input shapes {shapes}")
            answer = await self.call(self._alone, tuned, args, kwargs)
        if isinstance(answer, Refused):
            raise answer
        if isinstance(answer, BaseException):
            raise Refused(500, f"{model} failed: {type(answer).__name__}: {str(answer).splitlines()[0] if str(answer) else ''}")
        return answer
