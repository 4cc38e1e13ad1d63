"""Arguments, exit codes and helpers shared by the subcommands. Heavy imports stay inside functions so
that `--help` is fast.

Exit codes (one per kind of problem, so scripts can tell them apart):

| code | meaning |
|---|---|
| 0 | success |
| 1 | an internal error (a bug: the traceback is printed) |
| 2 | a bad flag or value (usage) |
| 3 | an input cannot be used: missing, corrupt or unreadable file, unreadable image |
| 4 | the output folder holds something made differently, or another process is writing it |
| 5 | the output cannot be written: a file, read-only, or the disk is full |
| 6 | the requested device is not available |
| 130 | interrupted (Ctrl-C); the message says what was saved |
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_CONFLICT = 4
EXIT_OUTPUT = 5
EXIT_DEVICE = 6
EXIT_INTERRUPTED = 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "an internal error (a bug: the traceback is printed)",
    EXIT_USAGE: "a bad flag or value",
    EXIT_INPUT: "an input cannot be used (missing, corrupt or unreadable file or image)",
    EXIT_CONFLICT: "the output folder holds something made differently, or another process is writing it",
    EXIT_OUTPUT: "the output cannot be written (a file, read-only, disk full)",
    EXIT_DEVICE: "the requested device is not available",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); the message says what was saved",
}
DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-B-32", "openai"


def error_exit_code(e: BaseException) -> int | None:
    """The exit code for a user error, or None for an unexpected one (a bug: shown with its traceback)."""
    from ..core.errors import ConflictError, DeviceError, InputError, OutputError, VisionSteerError

    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(e, DeviceError):
        return EXIT_DEVICE
    if isinstance(e, ConflictError):
        return EXIT_CONFLICT
    if isinstance(e, OutputError):
        return EXIT_OUTPUT
    if isinstance(e, InputError):
        return EXIT_INPUT
    if isinstance(e, VisionSteerError):  # our other user errors carry their code (UsageError: 2)
        return e.exit_code
    # The operating system's file errors are the environment's, not bugs: a missing input, a full disk.
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return EXIT_INPUT
    if isinstance(e, OSError):  # disk full, permission denied, ... while writing
        return EXIT_OUTPUT
    return None  # anything else (a ValueError, KeyError or TypeError included) is a bug


# Library argument -> flag, where the flag is not `--` + the argument with dashes. A command module may
# override entries with its own `ARGUMENT_FLAGS` (e.g. `run` trains with --train-batch-size).
ARGUMENT_FLAGS = {"expansion_factor": "--expansion", "total_training_samples": "--samples",
                  "lr_warm_up_steps": "--warmup-steps", "lr_decay_steps": None, "sae": "--sae"}


def with_flags(text: str, arguments: Sequence[str], flags: Mapping[str, str | None] | None = None) -> str:
    """`text` with each library argument it names followed by the CLI flag that sets it: `k=0 must ...` ->
    `k=0 (--k) must ...` (the first mention of each; arguments with no flag are left as they are)."""
    table = {**ARGUMENT_FLAGS, **(flags or {})}
    for arg in arguments:
        flag = table[arg] if arg in table else "--" + arg.replace("_", "-")
        if flag:
            text = re.sub(rf"(?<![\w-]){re.escape(arg)}(=[^\s,;:)]+)?(?![\w-])", lambda m: f"{m.group(0)} ({flag})",
                          text, count=1)
    return text


def error_message(e: BaseException, flags: Mapping[str, str | None] | None = None) -> str:
    """One line naming the file or flag, with a hint. `flags`: the command's own argument -> flag names."""
    from ..core.fileio import describe_os_error
    from ..data.base import BadImageError

    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = with_flags(text, getattr(e, "arguments", ()), flags)
    if isinstance(e, BadImageError):
        return f"{text}; use --skip-bad-images to skip and count unreadable images"
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno is not None:
        where = f" {e.filename}" if e.filename else ""
        return (f"cannot write{where}: {describe_os_error(e)}; free some space or choose another --out "
                "(what was written before stays valid; run the command again to continue)")
    return " ".join(text.split()) or type(e).__name__


# ---------------------------------------------------------------------------------- arguments
def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def non_negative_int(text: str) -> int:
    v = int(text) if text.lstrip("-").isdigit() else None
    if v is None or v < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return v


def positive_float(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return v


def finite_float(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def json_object(text: str) -> dict[str, Any]:
    from ..core.errors import UsageError
    from ..core.fileio import reject_duplicate_keys

    try:
        v = json.loads(text, object_pairs_hook=reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    except UsageError as e:  # a key given twice: say which, rather than keep the last one
        raise argparse.ArgumentTypeError(str(e)) from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"vision_cfg\": {...}}'")
    return v


def add_model_args(p: argparse.ArgumentParser, from_sae: bool = False) -> None:
    g = p.add_argument_group("model")
    default = "the SAE's recorded model, else " if from_sae else ""
    g.add_argument("--model", default=None,
                   help=f"open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, hf-hub:ORG/NAME, local-dir:DIR); "
                        f"default: {default}{DEFAULT_MODEL}")
    g.add_argument("--pretrained", default=None,
                   help=f"open_clip pretrained tag or checkpoint path (needs network the first time); default: "
                        f"{'the SAE' + chr(39) + 's recorded tag, else ' if from_sae else ''}{DEFAULT_PRETRAINED} "
                        "(none for hf-hub: and local-dir: names, whose weights come with the name)")
    g.add_argument("--random-weights", action="store_true",
                   help="use randomly initialised weights instead of --pretrained (offline smoke runs)")
    g.add_argument("--model-kwargs", type=json_object, default=None,
                   help='JSON of extra open_clip.create_model arguments, e.g. \'{"vision_cfg": {...}}\''
                        + ("; default: the SAE's recorded ones" if from_sae else ""))
    add_device_arg(g)
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="the image tower's precision: torch autocast to bf16 or fp16 for its forward passes "
                        "(fp16 on a CPU runs as bf16, said on a line); caches record it")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")


def default_workers() -> int:
    """Image-decoding workers for a machine: one core left to the model, at least 2, at most 8."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return min(8, max(2, cores - 1))


def add_device_arg(g: Any) -> None:
    g.add_argument("--device", default="auto", help="torch device (cpu, cuda, cuda:1, mps); auto = cuda when available")


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_text_cache_args(g: Any) -> None:
    g.add_argument("--text-cache", default=None, metavar="DIR",
                   help="folder caching the class-prompt text embeddings (default: $VISION_STEER_TEXT_CACHE, else "
                        "~/.cache/sae_lens_vision_steer/text)")
    g.add_argument("--no-text-cache", action="store_true", help="encode the prompts again and cache nothing")


def resolve_text_cache(args: argparse.Namespace) -> Path | None:
    """The text-embedding cache folder of `--text-cache` / `--no-text-cache` / the environment, or None."""
    from ..zeroshot.text_cache import default_text_cache_dir

    if getattr(args, "no_text_cache", False):
        return None
    if getattr(args, "text_cache", None):
        return Path(args.text_cache).expanduser()
    return default_text_cache_dir()


def add_data_args(p: argparse.ArgumentParser, split: str = "val") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100",
                   help="cifar100, tiny-imagenet, cub200, aircraft, food101, flowers102, caltech101, sun397, eurosat, "
                        "imagefolder, or a Hub repo id; several, comma-separated (cifar100,cub200,tiny-imagenet), "
                        "make one union: one cache with per-row data-set ids (eval: one table per data set)")
    g.add_argument("--data-dir", default=None,
                   help="local data folder; without it the data set comes from the Hub. For a union: one per member, "
                        "comma-separated in member order (empty = Hub), or member=DIR pairs")
    g.add_argument("--split", default=split,
                   help="data split (imagefolder: a subfolder such as train or val; 'all' = the whole folder)")
    g.add_argument("--limit", type=positive_int, default=None,
                   help="use only this many images (evenly spaced); for a union, this many of every member")
    g.add_argument("--batch-size", type=positive_int, default=256)
    g.add_argument("--num-workers", type=non_negative_int, default=default_workers(),
                   help="DataLoader workers (default: from the cores, 2 to 8)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images instead of failing")


def resolve_device(name: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; a device that is not there is refused."""
    import torch

    from ..core.errors import DeviceError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is visible to torch; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"--device {name}: Apple MPS is not available; use --device cpu (or auto)")
    return name


def resolve_model_args(args: argparse.Namespace, sae=None, sae_dir: str | None = None) -> list[str]:
    """Fill `--model`, `--pretrained`, `--model-kwargs` (and `--random-weights`) that were not given:
    from the SAE's metadata when there is an SAE (a `local-dir:` model is looked for: `sae.match.
    find_recorded_model`), else the defaults. Returns notes to print."""
    from ..core.identity import portable_model_name, weights_from_name

    meta = sae.cfg.metadata if sae is not None else {}
    notes = []
    recorded_model = meta.get("model_name")
    if args.model is None:
        if recorded_model:
            from ..sae.match import find_recorded_model

            args.model = find_recorded_model(meta, sae_dir)
            notes.append(f"model {args.model} (from the SAE's metadata)")
        else:
            args.model = DEFAULT_MODEL
    same_model = recorded_model is not None and portable_model_name(args.model) == portable_model_name(recorded_model)
    if args.model_kwargs is None:
        args.model_kwargs = dict(meta.get("model_kwargs") or {}) if same_model else {}
    if args.pretrained is None and not args.random_weights:
        if same_model and "pretrained" in meta:
            if meta.get("pretrained") is None and not weights_from_name(args.model):
                args.random_weights = True  # the SAE was trained on a randomly initialised tower
                notes.append(f"random weights, seed {args.seed} (the SAE was trained on a random-weight model)")
            elif meta.get("pretrained") is not None:
                args.pretrained = meta.get("pretrained")
                notes.append(f"weights {args.pretrained} (from the SAE's metadata)")
        elif not weights_from_name(args.model):
            args.pretrained = DEFAULT_PRETRAINED
    return notes


def load_model(args: argparse.Namespace):
    """The model the flags name. The data sets the flags name are checked first (`data.check_data_available`):
    a Hub data set that cannot be had offline is reported at once, not after the model is built."""
    import torch

    from ..core.identity import weights_from_name
    from ..core.precision import resolve_precision
    from ..data import check_data_available
    from ..models.kwargs import check_kwarg_names
    from ..sae.splice import HookedCLIP

    if getattr(args, "dataset", None) and not getattr(args, "stream", False):
        check_data_available(args.dataset, getattr(args, "data_dir", None))

    if args.model is None:
        resolve_model_args(args)
    kwargs = check_kwarg_names(dict(args.model_kwargs or {}))  # {"device": ...} would collide with --device
    if args.random_weights:
        torch.manual_seed(args.seed)
        pretrained = None
        if weights_from_name(args.model):
            kwargs["load_weights"] = False  # open_clip loads an hf-hub:/local-dir: model's weights otherwise
    else:
        pretrained = args.pretrained
    model = HookedCLIP.from_pretrained(args.model, pretrained=pretrained, device=args.device, **kwargs)
    precision, note = resolve_precision(getattr(args, "precision", "fp32"), model.device)
    if note:
        print(f"--precision {args.precision}: {note}")
    return model.set_precision(precision)


def load_data(args: argparse.Namespace, model, split: str | None = None):
    from ..data import load_image_dataset

    return load_image_dataset(args.dataset, split=split or args.split, data_dir=args.data_dir,
                              transform=model.preprocess, limit=args.limit, skip_bad_images=args.skip_bad_images,
                              stream=getattr(args, "stream", False))  # `cache --stream` (streaming.py)


def abspath(p: str | None) -> str | None:
    return None if p is None else str(Path(p).expanduser().resolve())


def peak_rss_mib() -> float:
    """Peak resident memory of this process and its finished children (DataLoader workers), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    per_mib = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return max(own, kids) / per_mib


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    from ..core.fileio import write_json_atomic as _write
    from ..evaluation.results import json_default

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write(path, obj, indent=2, default=json_default)

