"""The model-family registry's leaf: `Family`, `register`, `describe` and `UnsupportedModelError`. The family
modules import only this; `families/__init__` registers the built-in ones (as saev's registry is filled)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ...core.errors import UnsupportedError, UsageError
from ..tower import Tower


@dataclass(frozen=True)
class Family:
    name: str
    description: str  # what it covers, for error messages and the support table
    handles: Callable[[nn.Module], bool]
    tower: Callable[..., Tower]  # (model, model_name=..., preprocess=..., tokenizer=...) -> Tower


FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    if any(f.name == family.name for f in FAMILIES):
        raise UsageError(f"model family {family.name!r} is already registered")
    FAMILIES.append(family)
    return family


def describe() -> str:
    return "; ".join(f"{f.name} ({f.description})" for f in FAMILIES)


class UnsupportedModelError(UnsupportedError):
    """A model or name no registered family can adapt (raised before any weights are downloaded)."""
