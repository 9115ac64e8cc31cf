"""``python -m orchestrator``: ``tune SPEC...`` runs a whole sweep, ``plan SPEC...`` says what it would
do and cost (running nothing), ``report STORE`` prints a past one. Several specs make one sweep:
models concatenated, other settings given once or alike (see orchestrator/spec_merge.py).

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

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _tune(args: argparse.Namespace, console: Console) -> int:
    from orchestrator.candidates import ModelLoadError
    from orchestrator.spec import SpecError
    from orchestrator.spec_merge import load_specs
    from orchestrator.store import StoreError
    from orchestrator.sweep import run_sweep

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
        outcome = run_sweep(
            spec, address=args.address, store_root=args.store, force=args.force, retry_failed=args.retry_failed,
            deploy=not args.no_deploy, console=console,
        )
    except (StoreError, ModelLoadError) as exc:
        _say(console, f"error: {exc}")
        return EXIT_BAD_INPUT
    done = [d for d in outcome.deployments if d.status == "deployed"]
    how = ", ".join(f"{n} {k}" for k, n in sorted(outcome.how.items()))
    _say(console, f"sweep {outcome.sweep_id}: {outcome.ran} run, {outcome.reused} from store ({how or 'nothing'}), "
                  f"{len(outcome.selections)} winner group(s), {len(done)}/{len(outcome.deployments)} deployments "
                  f"verified; tuning took {outcome.tune_s:.1f} s")
    problems = outcome.problems
    for problem in problems:
        _say(console, f"not done: {problem}")
    return EXIT_INCOMPLETE if problems else EXIT_OK


def _plan(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from orchestrator.candidates import ModelLoadError
    from orchestrator.forecast import forecast, write_plan
    from orchestrator.spec import SpecError
    from orchestrator.spec_merge import load_specs
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
    from orchestrator.report import report_store
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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch-internal, raised inside torch.export
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
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Reports are tables: keep them readable when output goes to a file or a CI log.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        commands = {"tune": _tune, "plan": _plan, "report": _report}
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
