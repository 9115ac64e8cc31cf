"""``run_sweep``: the pipeline the README draws.

    prepare (store, models: before Ray starts) -> connect -> start the session's workers
    -> tune (plan, take what the store holds, run the rest) -> select -> deploy -> report
"""

from __future__ import annotations

import dataclasses
import logging

from rich.console import Console

from cluster import Inventory, connect, plan_deploy_targets, plan_worker_slots
from cluster.node_share import start_node_shares
from orchestrator.dispatch.progress import Progress
from orchestrator.dispatch.scheduler import Limits, Scheduler
from orchestrator.planning.candidates import Toolchains
from orchestrator.spec.schema import SweepSpec
from orchestrator.store import SweepStatus
from orchestrator.sweep.options import SweepOptions, SweepOutcome
from orchestrator.sweep.prepare import prepare
from orchestrator.sweep.serving import search_serving, serving_ingress
from orchestrator.sweep.session import SweepSession
from orchestrator.sweep.workers import Heartbeat, ReferenceAsks, Workers
from orchestrator.worker.ray_pool import RayPool

log = logging.getLogger(__name__)


def limits_of(spec: SweepSpec) -> Limits:
    return Limits(spec.budgets.build_timeout_s, spec.budgets.measure_timeout_s, spec.budgets.total_s)


def _places(spec: SweepSpec, options: SweepOptions):
    """The cluster's inventory and the worker slots; deploy targets it can't satisfy are refused
    here, before any worker starts."""
    inventory = Inventory.from_ray()
    slots = plan_worker_slots(inventory, cpu_slots=spec.workers.cpu_slots,
                              threads_per_slot=spec.workers.threads_per_slot, use_gpus=spec.workers.use_gpus)
    if options.deploy and spec.deploy.targets:
        try:
            plan_deploy_targets(inventory, spec.deploy.targets)
        except ValueError as exc:
            raise ValueError(f"deploy.targets: {exc}") from None
    return inventory, slots


def run_sweep(spec: SweepSpec, options: SweepOptions | None = None, /, **fields) -> SweepOutcome:
    """Tune, select, deploy and report one sweep. ``options`` (or its fields as keywords) say how."""
    options = dataclasses.replace(options or SweepOptions(), **fields)
    console = options.console or Console()
    # Everything that can be refused is refused before Ray starts: the store, then the models.
    prepared = prepare(spec, options.store_root, options.store)
    try:
        with serving_ingress(spec, options.address):  # latency_target: measure what serve serves
            handle = connect(options.address, **(options.ray_init or {}))
    except BaseException:
        prepared.undo()
        raise
    scheduler, sweep_id, store = None, None, prepared.store
    try:
        inventory, slots = _places(spec, options)
        # Owned by the driver: they hand out core blocks and the measure lock for the whole sweep.
        node_shares = start_node_shares([n.node_id for n in inventory.alive_nodes])  # noqa: F841
        sweep_id = store.begin_sweep(spec.name, spec.model_dump(mode="json"), objective=spec.strategy().describe())
        console.print(f"sweep {sweep_id}: {len(slots)} worker slot(s) on {len(inventory.nodes)} node(s); "
                      f"store {store.root or 'in memory'}", markup=False, highlight=False)
        for name, plan in prepared.shapes.items():
            console.print(plan.line(name), markup=False, highlight=False)
        progress = Progress(console, live=options.live)
        with Heartbeat(store, sweep_id):
            asks = ReferenceAsks(store)
            session = SweepSession(spec, options, store, sweep_id, prepared.identities, None, progress, asks, console,
                                   shapes=prepared.shapes)
            scheduler = Scheduler(slots, spec.model_dump(mode="json"), limits_of(spec), on_result=session.commit,
                                  events=progress, pool=RayPool(), toolchain=Toolchains())
            session.workers = Workers(scheduler, slots, local=handle.embedded)
            tuned = session.tune()
            selections, decide_s = session.select(tuned)
            scheduler.shutdown()
            scheduler = None
            deployments = session.deploy(tuned, selections, inventory)
            serving = search_serving(spec, store, sweep_id, deployments, inventory, session._say) \
                if spec.latency_target is not None and deployments else []
        store.finish_sweep(sweep_id, SweepStatus.DONE)
        outcome = session.outcome(tuned, selections, deployments, decide_s)
        outcome.serving = serving
        if options.write_report:
            session.report(outcome)
        return outcome
    except BaseException as exc:
        if sweep_id is not None:
            status = SweepStatus.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else f"failed: {type(exc).__name__}"
            try:
                store.finish_sweep(sweep_id, status)
            except Exception as inner:  # the original error matters more
                log.warning("could not mark sweep %s as %s: %s", sweep_id, status, inner)
        raise
    finally:
        if scheduler is not None:
            scheduler.shutdown()
        prepared.close()
        handle.shutdown()
