"""One device's worker: the Ray actor, process set-up, RayPool, the model cache, memory hygiene. Imports spec, planning and dispatch's interface."""
