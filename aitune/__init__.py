"""aitune: tune one PyTorch model on one device.

The Backend API lives in :mod:`aitune.torch.backend`; :func:`tune` builds, checks and measures
candidates one after another and keeps the fastest correct one.
"""

from aitune.specs import GraphSpec, Sample, TensorSpec
from aitune.torch.module_ref import attach_factory


def __getattr__(name):  # keep `import aitune` light: torch backends load on first use
    if name in ("tune", "TuneResult", "CandidateResult"):
        from aitune import tuning as _tune_module

        return getattr(_tune_module, name)
    if name in ("load_tuned", "TunedModel", "TunedModelError", "UntunedShape"):
        from aitune import loader

        return getattr(loader, name)
    if name == "Strategy":
        from aitune.strategy import Strategy

        return Strategy
    raise AttributeError(f"module 'aitune' has no attribute {name!r}")


__all__ = ["GraphSpec", "Sample", "TensorSpec", "attach_factory", "tune", "TuneResult", "CandidateResult", "Strategy",
           "load_tuned", "TunedModel", "TunedModelError", "UntunedShape"]
