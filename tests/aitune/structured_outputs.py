"""Models whose outputs torch's pytree can't keep by itself: a named tuple, a dataclass.

Importable by subprocesses as ``structured_outputs`` (the deploy side finds the types here when
this module is imported, and makes stand-ins of the same shape when it is not).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import nn


class Scores(NamedTuple):
    logits: torch.Tensor
    best: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Boxes:
    boxes: torch.Tensor
    meta: dict


class NamedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> Scores:
        y = self.linear(x)
        return Scores(y, y.argmax(-1))


class BoxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> Boxes:
        y = self.linear(x)
        return Boxes(y, {"count": 4, "parts": (y.sigmoid(), None)})


def named_head() -> NamedHead:
    torch.manual_seed(0)
    return NamedHead().eval()


def box_head() -> BoxHead:
    torch.manual_seed(1)
    return BoxHead().eval()


class Flagged(nn.Module):
    """A flag that is no tensor changes what forward returns (as HF models' ``return_dict``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, return_dict: bool = True):
        y = self.linear(x)
        return {"y": y} if return_dict else (y,)
