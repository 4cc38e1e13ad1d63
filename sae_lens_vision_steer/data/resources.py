"""Class names and prompt templates shipped as package data (`resources/zeroshot.json`).

Built by `scripts/build_zeroshot_resources.py` from open_clip's ImageNet-1k names, CLIP's
published CIFAR templates and CUB-200-2011's `classes.txt`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from ..core.errors import UnknownNameError

# data set -> default template set, as in CLIP's evaluations
DEFAULT_TEMPLATES = {"cifar100": "cifar", "tiny-imagenet": "imagenet", "cub200": "cub"}


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    return json.loads(resources.files("sae_lens_vision_steer").joinpath("resources/zeroshot.json").read_text())


def classnames_for(dataset: str) -> Any:
    """CIFAR-100 and CUB-200 give a list in label order; Tiny-ImageNet gives a {wnid: name} dict."""
    key = {"cifar100": "cifar100", "cub200": "cub200", "tiny-imagenet": "tiny_imagenet"}.get(dataset)
    if key is None:
        raise UnknownNameError(f"no shipped class names for {dataset!r}; known: cifar100, cub200, tiny-imagenet")
    value = _table()["classnames"][key]
    return dict(value) if isinstance(value, dict) else list(value)


def templates_for(name: str) -> list[str]:
    """`name` is a template set (`cifar`, `imagenet`, `cub`, `single`) or a data set id."""
    name = DEFAULT_TEMPLATES.get(name, name)
    table = _table()["templates"]
    if name not in table:
        raise UnknownNameError(f"unknown template set {name!r}; choose from {sorted(table)}")
    return list(table[name])
