"""Costs for `reproduce --dry-run`: FLOPs counted on the real architectures, facts with their sources,
and per-image seconds (measured by the user on their machine, or a stated bound).

- `architecture_profile(model)`: parameters (so the float32 checkpoint size) and image/text FLOPs per
  input, counted by `torch.utils.flop_counter.FlopCounterMode` on the open_clip model built on the
  meta device (no weights, no download, under a second even for ViT-L/14).
- `Costs`: seconds per image by backbone. `Costs.from_file` reads a JSON the user measured (e.g. with
  `benchmarks/reproduce_costs.py` on their GPU); `Costs.gpu_peak_bound()` divides the counted FLOPs by
  the H200's published FP32 peak (a lower bound on time: no real run reaches the peak, and data
  loading is left out). Nothing here is a made-up GPU measurement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.errors import UsageError
from ..core.fileio import read_json_file


def facts() -> dict[str, Any]:
    """`resources/reproduce_facts.json`: download sizes, GPU peak, TPT views, each with its source."""
    return json.loads(resources.files("sae_lens_vision_steer").joinpath("resources/reproduce_facts.json").read_text())


@dataclass(frozen=True)
class ArchProfile:
    model: str
    n_params: int
    n_vision_params: int
    image_flops: float  # one image through the image tower
    text_flops: float  # one prompt through the text tower
    d_model: int
    n_layers: int

    @property
    def float32_mb(self) -> float:
        return self.n_params * 4 / 1e6


@lru_cache(maxsize=None)
def architecture_profile(model: str, model_kwargs: str = "{}") -> ArchProfile:
    """Counted on the open_clip architecture built on the meta device (no weights are read)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    name = model[len("local-dir:"):] if model.startswith("local-dir:") else model
    kwargs = json.loads(model_kwargs)
    if model.startswith("local-dir:"):  # the small CLIP: its config sits next to its weights
        cfg = json.loads((Path(name) / "open_clip_config.json").read_text())["model_cfg"]
        name, kwargs = "ViT-B-32", {**cfg, **kwargs}
    import logging

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no weights were loaded: none are wanted
    try:
        with torch.device("meta"):
            clip = open_clip.create_model(name, pretrained=None, device="meta", **kwargs)
    finally:
        logging.getLogger().setLevel(quiet)
    size = clip.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    with FlopCounterMode(display=False) as image:
        clip.visual(torch.empty(1, 3, *size, device="meta"))
    with FlopCounterMode(display=False) as text:
        clip.encode_text(torch.zeros(1, clip.context_length, dtype=torch.long, device="meta"))
    width = clip.visual.transformer.width
    return ArchProfile(model, sum(p.numel() for p in clip.parameters()),
                       sum(p.numel() for p in clip.visual.parameters()), float(image.get_total_flops()),
                       float(text.get_total_flops()), int(width), int(clip.visual.transformer.layers))


def sae_train_flops_per_sample(d_in: int, d_sae: int) -> float:
    """Encoder and decoder matmuls (2 d_in d_sae FLOPs each) forward, twice that backward: 12 d_in d_sae."""
    return 12.0 * d_in * d_sae


@dataclass(frozen=True)
class Costs:
    """Seconds per image (by backbone name) and per SAE training sample, with what they are."""

    label: str
    where: str = "the machine the costs were measured on"
    image_seconds: dict[str, float] = field(default_factory=dict)  # measured per backbone
    flops_per_second: float | None = None  # a rate, used where no per-backbone seconds are given
    sae_sample_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def gpu_peak_bound(cls) -> "Costs":
        gpu = facts()["gpu"]
        return cls(f"lower bound: counted FLOPs / the {gpu['name']} FP32 peak of {gpu['fp32_tflops']} TFLOP/s "
                   f"(source: {gpu['source'].split(';')[0]}); real runs are slower (utilisation < 100%, data "
                   "loading)", where=f"one {gpu['name']} GPU, lower bound", flops_per_second=gpu["fp32_tflops"] * 1e12)

    @classmethod
    def from_file(cls, path: str | Path) -> "Costs":
        path = Path(path)
        obj = read_json_file(path, "--costs")
        image = obj.get("image_seconds_per_image") or {}
        rate = obj.get("flops_per_second")
        if not isinstance(image, dict) or not all(_positive(v) for v in image.values()) or (
                rate is not None and not _positive(rate)) or (not image and rate is None):
            raise UsageError(f"--costs {path}: expected 'image_seconds_per_image' {{backbone: seconds > 0}} and/or "
                             "'flops_per_second' > 0 (optional 'sae_seconds_per_sample', 'label')")
        return cls(f"measured: {obj.get('label') or path}", f"as measured in {path.name}", dict(image), rate,
                   dict(obj.get("sae_seconds_per_sample") or {}))

    def image_s(self, backbone: str, profile: ArchProfile) -> float | None:
        if backbone in self.image_seconds:
            return float(self.image_seconds[backbone])
        return profile.image_flops / self.flops_per_second if self.flops_per_second else None

    def sae_sample_s(self, backbone: str, d_in: int, d_sae: int) -> float | None:
        if backbone in self.sae_sample_seconds:
            return float(self.sae_sample_seconds[backbone])
        return sae_train_flops_per_sample(d_in, d_sae) / self.flops_per_second if self.flops_per_second else None


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def measure_image_seconds(model: Any, n_images: int = 8, batch_size: int = 8, repeats: int = 2) -> float:
    """Seconds per image of `model.encode_image` (a HookedCLIP) on random inputs, best of `repeats`."""
    import time

    import torch

    size = model.cfg.image_size if hasattr(model.cfg, "image_size") else 224
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.randn(batch_size, 3, *size, device=model.device, dtype=model.cfg.dtype)
    best = math.inf
    with torch.no_grad():
        model.encode_image(x[:1])  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(max(1, n_images // batch_size)):
                model.encode_image(x)
            best = min(best, (time.perf_counter() - t0) / (max(1, n_images // batch_size) * batch_size))
    return best


__all__ = ["ArchProfile", "Costs", "architecture_profile", "facts", "measure_image_seconds",
           "sae_train_flops_per_sample"]
