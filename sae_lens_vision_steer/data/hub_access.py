"""Can a Hub data set be had now? Offline (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`) or with the Hub
unreachable, a data set that is not in the Hugging Face cache is refused at once, naming `--data-dir`,
instead of `datasets` retrying for a minute and failing with a message about something else."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ..core.errors import MissingInputError

TRUE = {"1", "on", "yes", "true"}
PROBE_TIMEOUT_S = 3.0
# Data sets with a local loader, and the folder `--data-dir` takes for each.
LOCAL_FOLDERS = {"tiny-imagenet": "a tiny-imagenet-200/ folder", "cifar100": "a cifar-100-python/ folder"}


def offline_by_setting() -> str | None:
    """The environment variable that turns the Hub off, or None."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in TRUE:
            return var
    return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the Hub's endpoint (`HF_ENDPOINT`), at most `timeout` seconds."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hf_cache_dirs(repo: str) -> list[Path]:
    """Where `datasets` and `huggingface_hub` keep a data set repository's files: the environment read now,
    and the libraries' own settings (which a program may have changed after import)."""
    import sys

    from huggingface_hub import constants

    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    hubs = {Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub"),
            Path(constants.HF_HUB_CACHE)}
    data = {Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets")}
    if "datasets" in sys.modules:
        data.add(Path(sys.modules["datasets"].config.HF_DATASETS_CACHE))
    return ([h.expanduser() / ("datasets--" + repo.replace("/", "--")) for h in sorted(hubs)]
            + [d.expanduser() / repo.replace("/", "___") for d in sorted(data)])


def in_hf_cache(repo: str) -> bool:
    return any(p.is_dir() and any(p.iterdir()) for p in hf_cache_dirs(repo))


def check_hub_dataset_available(name: str, repo: str) -> None:
    """Raise a one-line `MissingInputError` when `repo` is not in the HF cache and the Hub is off or unreachable."""
    if in_hf_cache(repo):
        return
    why = offline_by_setting()
    why = f"{why} is set" if why else (None if hub_reachable() else "the Hub is unreachable (no network)")
    if why is None:
        return
    local = LOCAL_FOLDERS.get(name)
    hint = (f"pass data_dir (--data-dir) with {local}" if local else
            "download it once with network, or pass an image folder: --dataset imagefolder --data-dir DIR")
    raise MissingInputError(f"data set {name} ({repo}) is not in the Hugging Face cache and {why}; {hint}")
