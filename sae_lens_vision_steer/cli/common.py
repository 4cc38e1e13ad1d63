"""Arguments and helpers shared by the subcommands. Heavy imports stay inside functions so that
`--help` is fast."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-32", help="open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, ...)")
    g.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag, hf-hub: name or checkpoint path (needs network the first time)")
    g.add_argument("--random-weights", action="store_true",
                   help="use randomly initialised weights instead of --pretrained (offline smoke runs)")
    g.add_argument("--model-kwargs", type=json.loads, default={},
                   help='JSON of extra open_clip.create_model arguments, e.g. \'{"vision_cfg": {...}}\'')
    g.add_argument("--device", type=resolve_device, default="auto", help="torch device; auto = cuda when available")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")


def add_data_args(p: argparse.ArgumentParser, split: str = "val") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100",
                   help="cifar100, tiny-imagenet, cub200, imagefolder, or a Hub repo id")
    g.add_argument("--data-dir", default=None, help="local data folder; without it the data set comes from the Hub")
    g.add_argument("--split", default=split, help="data split")
    g.add_argument("--limit", type=int, default=None, help="use only this many images (evenly spaced)")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    g.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images instead of failing")


def resolve_device(name: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu` (argparse also applies this to the default)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(args: argparse.Namespace):
    import torch

    from ..hooked_clip import HookedCLIP

    if args.random_weights:
        torch.manual_seed(args.seed)
        pretrained = None
    else:
        pretrained = args.pretrained
    return HookedCLIP.from_pretrained(args.model, pretrained=pretrained, device=args.device, **args.model_kwargs)


def load_data(args: argparse.Namespace, model, split: str | None = None):
    from ..data import load_image_dataset

    return load_image_dataset(args.dataset, split=split or args.split, data_dir=args.data_dir,
                              transform=model.preprocess, limit=args.limit, skip_bad_images=args.skip_bad_images)


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its finished children (DataLoader workers), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    per_mib = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return max(own, kids) / per_mib


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=2, default=_json_default)
        tmp = f.name
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.ndarray):
        return [None if (isinstance(v, float) and v != v) else v for v in o.tolist()]
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
