"""The paper's six out-of-distribution data sets, from CLIP-benchmark's WebDataset repos on the Hub.

Each `clip-benchmark/wds_<name>` repository (the layout `clip_benchmark.datasets.builder.build_wds_dataset`
reads) holds

    classnames.txt                           one class name per line; line i is label i
    zeroshot_classification_templates.txt    one template per line, `{c}` for the class name
    <split>/nshards.txt                      the number of shards n
    <split>/0.tar ... <split>/{n-1}.tar      samples `<key>.webp` (or png/jpg) + `<key>.cls` (the label)

Class names, label order and templates are read from those files (nothing is copied by hand), the
shards through `huggingface_hub` (so a populated HF cache works with `HF_HUB_OFFLINE=1`) and decoded by
HF datasets' `webdataset` builder (columns `__key__`, `__url__`, `cls`, `webp`). Only the asked split's
shards are downloaded. Our `val` is the repos' `test` split, as for the other data sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import MissingInputError, UsageError

OOD_DATASETS: dict[str, str] = {  # our id -> Hub repo (clip_benchmark's name, `wds_` + name with / -> -)
    "aircraft": "clip-benchmark/wds_fgvc_aircraft",
    "food101": "clip-benchmark/wds_food101",
    "flowers102": "clip-benchmark/wds_vtab-flowers",
    "caltech101": "clip-benchmark/wds_vtab-caltech101",
    "sun397": "clip-benchmark/wds_sun397",
    "eurosat": "clip-benchmark/wds_vtab-eurosat",
}
OOD_ALIASES = {"fgvc-aircraft": "aircraft", "fgvc_aircraft": "aircraft", "food-101": "food101",
               "flowers": "flowers102", "flowers-102": "flowers102", "caltech-101": "caltech101",
               "sun-397": "sun397", "euro-sat": "eurosat"}
SPLITS = {"val": "test"}
IMAGE_COLUMNS = ("webp", "png", "jpg", "jpeg")
META_FILES = ("classnames.txt", "zeroshot_classification_templates.txt")


def clip_benchmark_templates(lines: list[str]) -> list[str]:
    """CLIP-benchmark's `{c}` templates as `str.format` templates with one `{}`."""
    out = []
    for t in lines:
        if "{c}" not in t:
            raise UsageError(f"template {t!r} has no {{c}} placeholder")
        out.append(t.replace("{", "{{").replace("}", "}}").replace("{{c}}", "{}"))
    return out


def _snapshot(repo: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:  # offline without a cache, network errors, a missing repo
        raise FileNotFoundError(f"cannot get {repo} from the Hugging Face Hub or the HF cache "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingInputError(f"{path.name} is missing from {path.parent} (not a CLIP-benchmark WebDataset repo?)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_ood_dataset(name: str, split: str, transform=None, skip_bad_images: bool = False):
    """`aircraft`, `food101`, `flowers102`, `caltech101`, `sun397` or `eurosat` as a `HubImageDataset`
    with the repo's class names (label order) and its zero-shot templates (`prompt_templates`)."""
    import datasets

    from .base import HubImageDataset

    repo = OOD_DATASETS[name]
    hub_split = SPLITS.get(split, split)
    root = _snapshot(repo, [*META_FILES, "*/nshards.txt"])
    available = sorted(p.parent.name for p in root.glob("*/nshards.txt"))
    if hub_split not in available:
        raise UsageError(f"{name} ({repo}) has no split {split!r}; it has {available}"
                         + (" (val = test)" if "test" in available else ""))
    classnames = _read_lines(root / META_FILES[0])
    templates = clip_benchmark_templates(_read_lines(root / META_FILES[1]))
    n_shards = int((root / hub_split / "nshards.txt").read_text().strip())
    root = _snapshot(repo, [*META_FILES, f"{hub_split}/nshards.txt", f"{hub_split}/*.tar"])
    shards = [root / hub_split / f"{i}.tar" for i in range(n_shards)]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise MissingInputError(f"{repo}: shards {missing[:3]} of split {hub_split!r} are not in the HF cache; "
                                "run once with network access")
    ds = datasets.load_dataset("webdataset", data_files={hub_split: [str(p) for p in shards]}, split=hub_split)
    image = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    if image is None or "cls" not in ds.column_names:
        raise UsageError(f"{repo}: expected columns 'cls' and one of {IMAGE_COLUMNS}, found {ds.column_names}")
    labels = ds["cls"]
    bad = sorted({int(v) for v in labels if not 0 <= int(v) < len(classnames)})
    if bad:
        raise UsageError(f"{repo}: labels {bad[:5]} are outside classnames.txt's {len(classnames)} classes")
    out = HubImageDataset(ds, dataset_id=name, split=split, image_column=image, label_column="cls",
                          classnames=classnames, transform=transform, skip_bad_images=skip_bad_images)
    out.hub_repo = repo
    out.prompt_templates = templates
    return out


def resolve_ood_name(name: str) -> str | None:
    name = OOD_ALIASES.get(name, name)
    return name if name in OOD_DATASETS else None


def dataset_templates(data: Any, default: Any = "single") -> Any:
    """The data set's own zero-shot templates (`prompt_templates`, e.g. CLIP-benchmark's), else `default`."""
    return getattr(data, "prompt_templates", None) or default


__all__ = ["OOD_DATASETS", "clip_benchmark_templates", "dataset_templates", "load_ood_dataset", "resolve_ood_name"]
