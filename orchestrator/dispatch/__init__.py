"""Driving workers: the scheduler loop and what it drives with. Imports no other stage, nor Ray.

- ``scheduler``: the dispatch loop (``Scheduler``, ``Limits``, ``JobGate``), one ``_Run`` per run
- ``fleet``: the worker handles, each with its lane of calls, and the fleet that spawns, replaces and drops them
- ``queues``: the jobs waiting per device class and model
- ``start_cost``: whether a worker starts a toolchain others started
- ``deaths``: a worker's death settled as a crash, an infra failure, or a job to run alone
- ``idle``: calls on the idle workers between runs (decision rounds, re-measuring)
- ``pool``: the ``WorkerPool`` interface the scheduler drives; ``clock``: the time it reads
- ``events``, ``progress``: named hooks for what happens, and the live progress log
"""
