"""One sweep from spec to report (``run_sweep``, ``SweepOptions``, ``SweepOutcome``), as the pipeline in ``run.py``. Imports every other stage and cluster.

- ``options``: what a sweep is asked to do beyond its spec, and what it did;
- ``prepare``: the store and the models, settled before Ray starts;
- ``workers``: starting workers, the heartbeat, store claims, reference asks;
- ``session``: tune, select, deploy, report, on one store and sweep id;
- ``deciding``: decision rounds on workers, the spec's tie order, earlier decisions that stand;
- ``run``: ``run_sweep``, stringing them together.
"""

from orchestrator.sweep.options import SweepOptions, SweepOutcome
from orchestrator.sweep.prepare import open_store
from orchestrator.sweep.run import run_sweep

__all__ = ["SweepOptions", "SweepOutcome", "open_store", "run_sweep"]
