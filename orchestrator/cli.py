"""``python -m orchestrator``: ``tune SPEC`` runs a whole sweep, ``report STORE`` prints a past one."""

from __future__ import annotations

import argparse
import logging
import os
import warnings
import sys

from rich.console import Console


def _tune(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.spec import SpecError, load_spec
    from orchestrator.sweep import run_sweep

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        console.print(str(exc), markup=False, highlight=False)
        return 2
    if args.cpu_slots is not None:
        spec.workers.cpu_slots = args.cpu_slots
    if args.threads is not None:
        spec.workers.threads_per_slot = args.threads
    outcome = run_sweep(
        spec,
        address=args.address,
        store_root=args.store,
        force=args.force,
        retry_failed=args.retry_failed,
        deploy=not args.no_deploy,
        console=console,
    )
    failed_deploys = [d for d in outcome.deployments if d.status != "deployed"]
    console.print(
        f"sweep {outcome.sweep_id}: {outcome.ran} run, {outcome.reused} from store, "
        f"{len(outcome.selections)} winner group(s), {len(outcome.deployments) - len(failed_deploys)}/"
        f"{len(outcome.deployments)} deployments verified; tuning took {outcome.tune_s:.1f} s"
    )
    return 0


def _report(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.report import report_store
    from orchestrator.store import StoreError

    try:
        paths = report_store(args.store, args.sweep, console=console, out_dir=args.out)
    except (LookupError, StoreError) as exc:  # no sweeps yet, an unknown --sweep id, not a usable store
        # args[0]: str() of a KeyError would wrap the message in quotes
        console.print(f"error: {exc.args[0] if exc.args else exc}", markup=False, highlight=False)
        return 2
    console.print("reports: " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch-internal, raised inside torch.export
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tune = sub.add_parser("tune", help="run a sweep: tune, select, deploy, report")
    tune.add_argument("spec", help="sweep spec (YAML or JSON)")
    tune.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    tune.add_argument("--store", default=None, help="store directory (default: the spec's 'store')")
    tune.add_argument("--force", action="store_true", help="run every candidate again, ignoring stored results")
    tune.add_argument("--retry-failed", action="store_true", help="run stored failures again (successes are reused)")
    tune.add_argument("--no-deploy", action="store_true", help="skip deploying the winners")
    tune.add_argument("--cpu-slots", type=int, default=None, help="CPU worker slots where there is no GPU")
    tune.add_argument("--threads", type=int, default=None, help="torch threads per CPU slot")
    report = sub.add_parser("report", help="print a past sweep again and write its JSON/CSV/Markdown/PNG reports")
    report.add_argument("store", help="store directory")
    report.add_argument("--sweep", default=None, help="sweep id (default: the latest)")
    report.add_argument("--out", default=None, help="where to write the reports (default: STORE/reports/SWEEP)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Reports are tables: keep them readable when output goes to a file or a CI log.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        return _tune(args, console) if args.command == "tune" else _report(args, console)
    except (ValueError, KeyError, FileNotFoundError, ConnectionError) as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
