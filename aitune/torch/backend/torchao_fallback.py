"""Per-layer fallback for a quantization scheme that fails its accuracy gates on the whole model.

Each quantizable layer is quantized alone, on a copy of the module, and its effect measured as the
SQNR of the model's outputs against the full-precision reference on the build sample: the lower,
the more sensitive. Then the most sensitive layers are left in full precision, 1, 2, 4... of them
(never all: that would quantize nothing), until the whole passes the gates or ``tries`` mixes
were tried. The probes run eagerly (no
compile); only the mix chosen is built for real.

The result names the layers kept in full precision; ``TorchAOBackend`` records them in its
checkpoint, so a deploy re-quantizes the same mix.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from aitune.accuracy import Gates, sqnr_db

log = logging.getLogger(__name__)

#: quantizes a module in place, leaving the layers named by the given patterns alone
Quantize = Callable[[torch.nn.Module, Sequence[str]], torch.nn.Module]


@dataclass
class Fallback:
    """What the search found: the layers kept in full precision (None: no mix passed, or the whole
    model passed and none is needed: see ``needed``), and what it tried."""

    needed: bool
    kept: list[str] | None
    #: layer -> SQNR (dB) of the outputs with that layer alone quantized, most sensitive first
    sensitivity: dict[str, float] = field(default_factory=dict)
    #: [(layers kept, gate report reason or None)] in the order tried
    tried: list[tuple[list[str], str | None]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # pairs, not a mapping: the order (most sensitive first) must survive JSON with sorted keys
        return {"needed": self.needed, "kept": self.kept, "sensitivity": [[k, v] for k, v in self.sensitivity.items()],
                "tried": [[list(k), why] for k, why in self.tried]}


def quantizable_layers(module: torch.nn.Module, excluded: Callable[[torch.nn.Module, str], bool]) -> list[str]:
    """The names of ``module``'s ``nn.Linear`` layers the scheme would quantize."""
    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear) and not excluded(m, name)]


def search(module: torch.nn.Module, quantize: Quantize, layers: list[str], run: Callable[[torch.nn.Module], Any],
           reference: Any, gates: Gates, tries: int) -> Fallback:
    """The smallest set of most sensitive ``layers`` to keep in full precision for ``gates`` to pass,
    trying at most ``tries`` mixes after the whole model; ``run`` gives a module's outputs on the
    build sample and ``reference`` the full-precision ones."""
    whole = gates.judge(run(quantize(copy.deepcopy(module), [])), reference)
    if whole.ok:
        return Fallback(needed=False, kept=[])
    found = Fallback(needed=True, kept=None, tried=[([], whole.reason)])
    found.sensitivity = _sensitivity(module, quantize, layers, run, reference)
    order = list(found.sensitivity)
    count = 1
    while count < len(order) and len(found.tried) <= tries:  # every layer kept would quantize nothing
        kept = order[:count]
        report = gates.judge(run(quantize(copy.deepcopy(module), kept)), reference)
        found.tried.append((kept, report.reason))
        if report.ok:
            found.kept = kept
            return found
        count *= 2
    log.info("no mix of %d layer(s) in full precision passed the gates in %d tries", len(order), tries)
    return found


def _sensitivity(module: torch.nn.Module, quantize: Quantize, layers: list[str], run, reference) -> dict[str, float]:
    scores = []
    for name in layers:
        others = [n for n in layers if n != name]
        figures = sqnr_db(run(quantize(copy.deepcopy(module), others)), reference)
        scores.append((min(figures.values(), default=float("inf")), name))
    return {name: score for score, name in sorted(scores)}
