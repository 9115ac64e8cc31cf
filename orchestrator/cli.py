"""``python -m orchestrator``: ``tune SPEC...`` runs a whole sweep, ``plan SPEC...`` says what it would
do and cost (running nothing), ``report STORE`` prints a past one; ``deploy STORE`` installs stored
winners on targets, ``rollback STORE`` switches them back one version, ``deployments STORE`` shows
what is live where, ``serve STORE`` serves them with Ray Serve. Several specs make one sweep: models
concatenated, other settings given once or alike (see orchestrator/spec/merge.py).

Exit codes: 0 when everything asked for was done (tuned, selected, deployed); 2 for bad input
(the spec, the store, the models, the arguments), refused before anything starts; 3 when the
sweep finished but something asked for did not happen (a deploy refused or failed, a group with
no correct candidate); 1 when the sweep failed; 130 when it was interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from rich.console import Console

from orchestrator.deploy.serve_request import (ServeRequest, free_port, loopback, nothing_installed, replica_error,
                                               serve_problem)
from aitune.shapes import at
from orchestrator.records import DeployStatus

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _tune(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.planning.candidates import ModelLoadError
    from orchestrator.spec.merge import load_specs
    from orchestrator.spec.schema import SpecError
    from orchestrator.store import StoreError
    from orchestrator.sweep import SweepOptions, run_sweep

    try:
        spec = load_specs(args.spec)
    except SpecError as exc:
        _say(console, str(exc))
        return EXIT_BAD_INPUT
    if args.store is not None and not args.store.strip():
        _say(console, "error: --store is empty: give a directory")
        return EXIT_BAD_INPUT
    for flag, value in (("--cpu-slots", args.cpu_slots), ("--threads", args.threads)):
        if value is not None and value <= 0:
            _say(console, f"error: {flag} must be a positive number, got {value}")
            return EXIT_BAD_INPUT
    if args.cpu_slots is not None:
        spec.workers.cpu_slots = args.cpu_slots
    if args.threads is not None:
        spec.workers.threads_per_slot = args.threads
    try:
        options = SweepOptions(address=args.address, store_root=args.store, force=args.force,
                               retry_failed=args.retry_failed, deploy=not args.no_deploy, console=console)
        outcome = run_sweep(spec, options)
    except (StoreError, ModelLoadError) as exc:
        _say(console, f"error: {exc}")
        return EXIT_BAD_INPUT
    done = [d for d in outcome.deployments if d.status == DeployStatus.DEPLOYED]
    how = ", ".join(f"{n} {k}" for k, n in sorted(outcome.how.items()))
    _say(console, f"sweep {outcome.sweep_id}: {outcome.ran} run, {outcome.reused} from store ({how or 'nothing'}), "
                  f"{len(outcome.selections)} winner group(s), {len(done)}/{len(outcome.deployments)} deployments "
                  f"verified; tuning took {outcome.tune_s:.1f} s")
    problems = outcome.problems
    for problem in problems:
        _say(console, f"not done: {problem}")
    if spec.deploy.serve and not args.no_deploy and not problems:  # deploy: {serve: true}
        return serve(ServeRequest(store=str(outcome.store), sweep=outcome.sweep_id, address=args.address), console)
    return EXIT_INCOMPLETE if problems else EXIT_OK


def _targets(given: list[str] | None) -> list | None:
    from orchestrator.deploy.stored import parse_target

    return [parse_target(t) for t in given] if given else None


def _deploy(args: argparse.Namespace, console: Console) -> int:
    from aitune.deploy_root import DeployRootError
    from orchestrator.deploy.install import NoWinnerForTarget
    from orchestrator.deploy.stored import DeployInputError, deploy_stored, rollback_stored
    from orchestrator.store import StoreError

    run = deploy_stored if args.command == "deploy" else rollback_stored
    try:
        records = run(args.store, sweep_id=args.sweep, models=args.model, targets=_targets(args.target), address=args.address, root=args.root)
    except (DeployInputError, NoWinnerForTarget, DeployRootError, StoreError) as exc:
        _say(console, f"error: {exc}")
        return EXIT_BAD_INPUT
    for r in records:
        where = f"{r.target} ({(r.worker or {}).get('device_name', '?')})"
        if r.status == DeployStatus.DEPLOYED:
            latency = f"{r.median_ms:.3f} ms" if r.median_ms is not None else "?"
            _say(console, f"{r.action}: {r.model} {at(r.batch_size, r.shape)} on {where}: {r.version} current in {r.root} "
                          f"(was {r.previous or 'none'}), verified, median {latency}")
        else:
            _say(console, f"not done: {r.model} {at(r.batch_size, r.shape)} on {where}: {r.action} {r.status}: {r.reason}")
    return EXIT_OK if records and all(r.status == DeployStatus.DEPLOYED for r in records) else EXIT_INCOMPLETE


def _deployments(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.deploy.serving_files import serving_lines
    from orchestrator.deploy.stored import DeployInputError, batching_lines, format_when, live_deployments
    from orchestrator.store import StoreError

    try:
        rows = live_deployments(args.store)
    except (DeployInputError, StoreError) as exc:
        _say(console, f"error: {exc}")
        return EXIT_BAD_INPUT
    if not rows:
        _say(console, f"nothing deployed from {args.store} yet: run `python -m orchestrator deploy {args.store}`")
        return EXIT_OK
    for r in rows:  # one line per place: easy to read and to grep
        latency = f"{r.median_ms:.3f} ms" if r.median_ms is not None else "?"
        when = f"{r.action} at {format_when(r.at)}" if r.at else "no install record"
        _say(console, f"{r.model} {at(r.batch_size, r.shape)} on {r.node} ({r.device}) in {r.root}: {r.version} from sweep {r.sweep_id} "
                      f"winner {r.winner}, verified {latency}, {when}" + (f"; DISAGREES {r.disk}" if r.disk else ""))
    for line in batching_lines(rows) + serving_lines(rows):
        _say(console, line)
    return EXIT_OK


def _serve(args: argparse.Namespace, console: Console) -> int:
    return serve(ServeRequest.from_args(args), console)


def serve(args: ServeRequest, console: Console) -> int:
    """Serve the installed winners of a store until interrupted; the exit code."""
    import time

    from cluster import Inventory, plan_deploy_targets
    from orchestrator.deploy.serve import start_serving, stop_serving

    ready = _serve_inputs(args, console)
    if isinstance(ready, int):
        return ready
    spec, models, batching = ready
    handle, direct, proxy_port = _connect_for_serving(args, console)
    try:
        try:
            slots = plan_deploy_targets(Inventory.from_ray(), spec.deploy.targets)
        except ValueError as exc:
            _say(console, f"error: deploy targets: {exc}")
            return EXIT_BAD_INPUT
        replicas = _serving_replicas(args, spec, models, slots, console)
        try:
            served = start_serving(spec.deploy.root, models, slots, host=args.host, port=proxy_port,
                                   max_body_bytes=int(args.max_body_mb * 1024 * 1024), body_timeout_s=args.body_timeout_s,
                                   batching=batching, replicas_per_slot=replicas)
        except Exception as exc:  # a replica that can't load what is installed
            _say(console, f"not done: serving {', '.join(models)} failed: {replica_error(exc)}")
            return EXIT_INCOMPLETE
        _say_served(console, served, models, direct)
        while True:
            time.sleep(3600)
    finally:
        try:
            stop_serving()
        finally:
            handle.shutdown()


def _serving_replicas(args: ServeRequest, spec, models: list[str], slots, console: Console) -> int:
    """Replicas per slot from the models' serving.json (read where the deploy root is this machine's)."""
    from cluster import Inventory
    from orchestrator.deploy.serving_files import serving_replicas

    if args.address or os.environ.get("RAY_ADDRESS"):
        return 1
    replicas, lines = serving_replicas(spec.deploy.root, models, slots, Inventory.from_ray().total_cpus)
    for line in lines:
        _say(console, line)
    return replicas


def _serve_inputs(args: ServeRequest, console: Console):
    """(spec, models, batching settings), or the exit code of a refusal: all before Ray starts."""
    from orchestrator.deploy.stored import DeployInputError, choose, open_existing, with_targets
    from orchestrator.store import StoreError

    try:
        with open_existing(args.store) as store:
            chosen = choose(store, args.sweep, args.model)
        spec = with_targets(chosen.spec, _targets(args.target), args.root)
    except (DeployInputError, StoreError) as exc:
        _say(console, f"error: {exc}")
        return EXIT_BAD_INPUT
    if not loopback(args.host):
        _say(console, f"warning: --host {args.host} opens the server beyond this machine; it has no authentication")
    problem = serve_problem(args)
    if problem:
        _say(console, f"error: {problem}")
        return EXIT_BAD_INPUT
    models = sorted({s.model for s in chosen.selections})
    try:
        batching = args.batching(models)
    except ValueError as exc:
        _say(console, f"error: {exc}")
        return EXIT_BAD_INPUT
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        missing = nothing_installed(spec.deploy.root, models)
        if missing:
            _say(console, f"error: {missing}: deploy first: python -m orchestrator deploy {args.store}")
            return EXIT_BAD_INPUT
    return spec, models, batching


def _connect_for_serving(args: ServeRequest, console: Console):
    """(cluster handle, direct ingress on, the proxy's port). Direct: the replicas take --port (and
    up), the proxy, still there, a free port of its own; Ray's processes read it when they start."""
    import contextlib

    import ray

    from cluster import connect
    from orchestrator.deploy.serve import direct_ingress_env

    embedded = not (args.address or os.environ.get("RAY_ADDRESS"))
    direct = args.ingress == "direct" and embedded and not ray.is_initialized()
    if args.ingress == "direct" and not embedded:
        _say(console, "note: on a Ray cluster, direct ingress is the cluster's own setting "
                      "(RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in every `ray start`'s environment)")
    proxy_port = free_port(args.host) if direct else args.port
    with direct_ingress_env(args.port) if direct else contextlib.nullcontext():
        handle = connect(args.address)
    return handle, direct, proxy_port


def _say_served(console: Console, served, models: list[str], direct: bool) -> None:
    _say(console, f"serving {', '.join(models)} on {served.replicas} replica(s) at {served.url}/v2/models/MODEL "
                  f"(Open Inference Protocol); Ctrl-C stops")
    if served.direct[1:]:
        _say(console, f"  the other replicas: {', '.join(served.direct[1:])} (a load balancer in front spreads the load)")
    if direct and not served.direct:
        _say(console, f"  direct ingress is not in effect on this Ray: served by the proxy at {served.proxy_url}")
    for model, force in served.batching.items():
        buckets = force.get("buckets") or {}
        if buckets:  # requests are padded to their bucket, then combined there
            each = "; ".join(f"{shape}: " + (f"up to {b['batch_sizes'][-1]} rows as {b['batch_sizes']}" if b["enabled"]
                                             else f"one request per call ({b['reason']})") for shape, b in buckets.items())
            _say(console, f"  {model}: requests padded to their bucket and combined within it; {each}")
            continue
        _say(console, f"  {model}: " + (f"dynamic batching up to {force['max_batch']} rows as "
                                        f"{force['batch_sizes']}, queue delay {force['max_queue_delay_ms']:g} ms "
                                        f"({force.get('settings_from', 'defaults')})"
                                        if force["enabled"] else f"one request per call: {force['reason']}"))


def _plan(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from orchestrator.planning.candidates import ModelLoadError
    from orchestrator.planning.forecast import forecast, write_plan
    from orchestrator.spec.merge import load_specs
    from orchestrator.spec.schema import SpecError
    from orchestrator.store import DB_NAME, MemoryStore, SqliteStore, StoreError

    try:
        spec = load_specs(args.spec)
    except SpecError as exc:
        _say(console, str(exc))
        return EXIT_BAD_INPUT
    root = Path(args.store or spec.store)
    try:  # a plan never creates or changes a store: read-only, or an empty one in memory
        store = SqliteStore(root, readonly=True) if (root / DB_NAME).is_file() else MemoryStore()
        with store:
            fc = forecast(spec, store, local=args.local)
    except (StoreError, ModelLoadError) as exc:
        _say(console, f"error: {exc}")
        return EXIT_BAD_INPUT
    for line in fc.lines():
        _say(console, line)
    if args.out:
        paths = write_plan(fc, args.out)
        _say(console, "plan: " + ", ".join(str(p) for p in paths.values()))
    return EXIT_OK


def _report(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.outcome.report import report_store
    from orchestrator.store import StoreError

    try:
        paths = report_store(args.store, args.sweep, console=console, out_dir=args.out)
    except (LookupError, StoreError, FileNotFoundError) as exc:  # no sweeps, an unknown --sweep, not a store
        # args[0]: str() of a KeyError would wrap the message in quotes
        _say(console, f"error: {exc.args[0] if exc.args else exc}")
        return EXIT_BAD_INPUT
    if paths:
        _say(console, "reports: " + ", ".join(str(p) for p in paths.values()))
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tune = sub.add_parser("tune", help="run a sweep: tune, select, deploy, report")
    tune.add_argument("spec", nargs="+", help="sweep spec(s) (YAML or JSON), merged into one sweep")
    tune.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    tune.add_argument("--store", default=None, help="store directory (default: the spec's 'store')")
    tune.add_argument("--force", action="store_true", help="build every candidate again, ignoring stored results")
    tune.add_argument("--retry-failed", action="store_true", help="run stored failures again (successes are reused)")
    tune.add_argument("--no-deploy", action="store_true", help="skip deploying the winners")
    tune.add_argument("--cpu-slots", type=int, default=None, help="CPU worker slots where there is no GPU")
    tune.add_argument("--threads", type=int, default=None, help="torch threads per CPU slot")
    plan = sub.add_parser("plan", help="what a sweep would run and cost, from the store; runs nothing")
    plan.add_argument("spec", nargs="+", help="sweep spec(s) (YAML or JSON), merged as tune does")
    plan.add_argument("--store", default=None, help="store directory (default: the spec's 'store')")
    plan.add_argument("--local", action="store_true", help="plan for this machine's CPU, not the store's device classes")
    plan.add_argument("--out", default=None, help="also write plan.json and plan.md here")
    report = sub.add_parser("report", help="print a past sweep again and write its JSON/CSV/Markdown/PNG reports")
    report.add_argument("store", help="store directory")
    report.add_argument("--sweep", default=None, help="sweep id (default: the latest)")
    report.add_argument("--out", default=None, help="where to write the reports (default: STORE/reports/SWEEP)")
    for name, text in (("deploy", "install a stored sweep's winners on the targets, verified there (no tuning)"),
                       ("rollback", "switch the targets back to the version installed before, verified"),
                       ("serve", "serve the installed winners with Ray Serve on HTTP (127.0.0.1 by default)")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("store", help="store directory")
        cmd.add_argument("--sweep", default=None, help="sweep id (default: the latest finished one with a winner)")
        cmd.add_argument("--model", action="append", default=None, help="a model to act on (repeat; default: all)")
        cmd.add_argument("--target", action="append", default=None,
                         help="all_gpus, gpus=N, cpu_slots=N or accelerator_type=NAME (repeat; default: the sweep's)")
        cmd.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
        cmd.add_argument("--root", default=None, help="deploy root on the targets (default: the spec's deploy.root, else ~/.cache/aitune/deploy)")
        if name == "serve":
            cmd.add_argument("--host", default="127.0.0.1", help="HTTP host (default: loopback only)")
            cmd.add_argument("--port", type=int, default=8000)
            cmd.add_argument("--max-body-mb", type=float, default=64.0,
                             help="refuse request bodies larger than this (413), from Content-Length before reading")
            cmd.add_argument("--body-timeout-s", type=float, default=10.0,
                             help="refuse a request body that has not arrived whole within this many seconds (408)")
            cmd.add_argument("--ingress", choices=["direct", "proxy"], default="direct",
                             help="direct (default): each replica answers HTTP itself at --port and up (an embedded "
                                  "Ray); proxy: through Ray Serve's proxy, one hop slower")
            cmd.add_argument("--no-batching", action="store_true",
                             help="answer each request with its own call (default: dynamic batching where the rows were checked)")
            cmd.add_argument("--max-queue-delay-ms", action="append", default=None, metavar="[MODEL=]MS",
                             help="how long a batch waits for requests already arriving (default 2; repeat per model)")
    live = sub.add_parser("deployments", help="what is live where: the last verified install per node, model, device and batch")
    live.add_argument("store", help="store directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch-internal, raised inside torch.export
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Reports are tables: keep them readable when output goes to a file or a CI log.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        commands = {"tune": _tune, "plan": _plan, "report": _report, "deploy": _deploy, "rollback": _deploy,
                    "deployments": _deployments, "serve": _serve}
        return commands[args.command](args, console)
    except KeyboardInterrupt:
        _say(console, "interrupted")
        return EXIT_INTERRUPTED
    except (ValueError, KeyError, FileNotFoundError, ConnectionError) as exc:
        _say(console, f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}")
        return EXIT_BAD_INPUT
    except Exception as exc:  # the sweep failed: one line, and the traceback with -v
        if args.verbose:
            logging.exception("sweep failed")
        _say(console, f"error: the sweep failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
