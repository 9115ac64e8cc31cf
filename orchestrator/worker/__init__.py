"""One device's worker. Imports spec, planning and dispatch's interface.

actor (TuneWorker, the Ray actor), process (a worker process's set-up: device, logs, compile
threads), on_node (its share of its node: cores, the measurement lock), references (its models and
their eager references), failures (how a candidate fails), hygiene (memory left behind, when to
recycle), heap (freezing and thawing the garbage collector's heap), model_cache, ray_pool (RayPool:
the scheduler's workers as Ray actors), pretend_gpus (test only).
"""
