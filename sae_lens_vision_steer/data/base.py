"""Labelled image data sets: the `ImageDataset` type, its loaders and the local and Hub sources.

Every source yields `(image_tensor, label)` through open_clip's preprocessing transform and carries
its prompt-ready class names. Images are converted to RGB (greyscale, RGBA, CMYK, palette; 16-bit,
32-bit integer and float greyscale are scaled to 8 bits first, see `to_rgb`).

Each data set has a portable `dataset_id` (`cifar100`, `owner/repo`, `imagefolder:<folder name>`) that
goes into published metadata; a local source also keeps its absolute `data_dir` (for local files only).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..core import distributed
from ..core.errors import InputError, MissingInputError, UsageError, VisionSteerError
from .files import NotRegularFileError, check_names, open_regular_file, shown_path
from .hub_access import check_hub_dataset_available
from .resources import classnames_for

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}

# Hub repos with the usual layouts. `labels` is the label column; names come from our resources.
HUB_DATASETS: dict[str, dict[str, Any]] = {
    "cifar100": dict(repo="uoft-cs/cifar100", image="img", label="fine_label", splits={"val": "test"}),
    "tiny-imagenet": dict(repo="zh-plus/tiny-imagenet", image="image", label="label", splits={"val": "valid", "test": "valid"}),
    "cub200": dict(repo="bentrevett/caltech-ucsd-birds-200-2011", image="image", label="label", splits={"val": "test"}),
}
DATASET_ALIASES = {"cifar-100": "cifar100", "tinyimagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet",
                   "cub": "cub200", "cub-200": "cub200", "cub-200-2011": "cub200"}


class BadImageError(VisionSteerError, RuntimeError):
    """An image that cannot be read or decoded (exit 3; `skip_bad_images=True` skips and counts them)."""

    exit_code = 3


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB, naming the file if it is not a regular file or cannot be decoded."""
    try:
        with open_regular_file(path) as f, Image.open(f) as img:
            img.load()
            return to_rgb(img)
    except NotRegularFileError as e:  # a FIFO would block forever: refused before it is read
        raise BadImageError(f"cannot read image {e}") from None
    except Exception as e:  # PIL raises several types for truncated / unknown files
        raise BadImageError(f"cannot read image {shown_path(path)}: {e}") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with high-bit-depth greyscale scaled to 8 bits first (PIL's `convert` clips it: a 16-bit
    PNG would come out almost white). 16-bit (`I;16*`): divided by 257, so 65535 -> 255. 32-bit
    integer (`I`): kept when in [0, 255], divided by 257 when in [0, 65535] (16-bit PNGs often open
    so), else min-max scaled. Float (`F`): [0, 1] -> x 255, [0, 255] kept, else min-max scaled."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img), img.mode), mode="L").convert("RGB")
    return img.convert("RGB")


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    x = arr.astype(np.float64)
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        x = x / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        x = x * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif mode == "I" and lo >= 0 and hi <= 65535:
        x = x / 257.0
    else:  # an unknown range: stretch it
        x = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
    return np.clip(np.nan_to_num(x, nan=0.0), 0, 255).round().astype(np.uint8)


class ImageDataset(Dataset):
    """A labelled image data set. Subclasses implement `load_image(i)` and set `labels`."""

    dataset_id: str  # portable: no local paths
    split: str
    classnames: list[str]
    labels: np.ndarray  # [N] int64, -1 where unknown
    data_dir: Path | None = None  # the local folder it was read from (absolute), if any
    hub_repo: str | None = None  # the Hub repository, if it comes from the Hub

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor] | None, skip_bad_images: bool = False):
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.indices: np.ndarray | None = None  # optional subset of the underlying items

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else self._num_items()

    def _num_items(self) -> int:
        return len(self.labels)

    def load_image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        return f"item {i}"

    def label(self, idx: int) -> int:
        i = int(self.indices[idx]) if self.indices is not None else idx
        return int(self.labels[i])

    def subset(self, n: int | None) -> "ImageDataset":
        """Keep `n` items evenly spaced over the data set (so every class is represented)."""
        if n is not None and n < self._num_items():
            self.indices = np.linspace(0, self._num_items() - 1, n).round().astype(np.int64)
        return self

    @property
    def relative_paths(self) -> list[str] | None:
        """The image files relative to `data_dir` (folder data sets), for fingerprints that survive a move."""
        paths = getattr(self, "paths", None)
        if paths is None or self.data_dir is None:
            return None
        return [Path(p).relative_to(self.data_dir).as_posix() for p in paths]

    @property
    def subset_labels(self) -> np.ndarray:
        return self.labels[self.indices] if self.indices is not None else self.labels

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int, int] | None:
        i = int(self.indices[idx]) if self.indices is not None else idx
        try:
            img = self.load_image(i)
        except BadImageError:
            if self.skip_bad_images:
                return None
            raise
        x = self.transform(img) if self.transform is not None else img
        return x, int(self.labels[i]), idx


@dataclass
class ImageBatch:
    images: torch.Tensor  # [B, 3, H, W]
    labels: torch.Tensor  # [B]
    indices: torch.Tensor  # [B] positions in the data set
    n_skipped: int  # unreadable images dropped from this batch (skip_bad_images=True)

    def pin_memory(self) -> "ImageBatch":
        """The images in page-locked memory (DataLoader `pin_memory=True`): the copy to a GPU can overlap."""
        return ImageBatch(self.images.pin_memory(), self.labels, self.indices, self.n_skipped)


def collate_images(items: Sequence[tuple[torch.Tensor, int, int] | None]) -> ImageBatch:
    kept = [it for it in items if it is not None]
    if not kept:
        return ImageBatch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), len(items))
    return ImageBatch(
        images=torch.stack([it[0] for it in kept]),
        labels=torch.tensor([it[1] for it in kept], dtype=torch.long),
        indices=torch.tensor([it[2] for it in kept], dtype=torch.long),
        n_skipped=len(items) - len(kept),
    )


def make_loader(dataset: ImageDataset, batch_size: int = 256, num_workers: int = 2,
                pin_memory: bool = False) -> DataLoader:
    """An ordered DataLoader with worker processes so that JPEG decoding does not starve the model.
    `pin_memory=True` (for a CUDA model) hands over page-locked batches: copy them with `non_blocking=True`."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=pin_memory,
    )


def shard_loader(dataset: Any, batch_size: int, num_workers: int, pin_memory: bool = False):
    """A DataLoader over this rank's block of the batch grid, in order (the whole data set in one process)."""
    if not distributed.active():
        return make_loader(dataset, batch_size, num_workers, pin_memory)
    return DataLoader(dataset, batch_sampler=distributed.batch_block(len(dataset), batch_size), num_workers=num_workers,
                      collate_fn=collate_images, prefetch_factor=4 if num_workers > 0 else None, pin_memory=pin_memory)


# ---------------------------------------------------------------------------------- local folders
class TinyImageNetFolder(ImageDataset):
    """The standard `tiny-imagenet-200/` layout (`wnids.txt`, `train/<wnid>/images`, `val/images` +
    `val/val_annotations.txt`). Class index = line number in `wnids.txt`."""

    def __init__(self, root: str | Path, split: str = "val", transform=None, skip_bad_images: bool = False):
        super().__init__(transform, skip_bad_images)
        root = Path(root).resolve()
        self.data_dir = root
        wnids_file = root / "wnids.txt"
        if not wnids_file.is_file():
            raise MissingInputError(f"{root} is not a Tiny-ImageNet-200 folder: {wnids_file} is missing")
        self.wnids = wnids_file.read_text().split()
        index = {w: i for i, w in enumerate(self.wnids)}
        names = classnames_for("tiny-imagenet")
        self.classnames = [names[w] for w in self.wnids]
        self.dataset_id, self.split = "tiny-imagenet", split
        if split == "val":
            ann = root / "val" / "val_annotations.txt"
            if not ann.is_file():
                raise MissingInputError(f"split 'val' not found: {ann} is missing")
            rows = [line.split("\t")[:2] for line in ann.read_text().splitlines() if line.strip()]
            rows.sort(key=lambda r: int(Path(r[0]).stem.split("_")[-1]))
            self.paths = [root / "val" / "images" / r[0] for r in rows]
            labels = [index[r[1]] for r in rows]
        elif split == "train":
            self.paths, labels = [], []
            for w in self.wnids:
                files = sorted((root / "train" / w / "images").glob("*"), key=lambda p: _natural_key(p.name))
                self.paths += files
                labels += [index[w]] * len(files)
        else:
            raise UsageError(f"Tiny-ImageNet split must be 'train' or 'val', got {split!r}")
        if not self.paths:
            raise MissingInputError(f"no images found for split {split!r} under {root}")
        check_names(self.paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self.paths[i])

    def describe(self, i: int) -> str:
        return str(self.paths[i])


class ImageFolderDataset(ImageDataset):
    """`root/<class_name>/*.jpg` (torchvision ImageFolder layout). Underscores in folder names become
    spaces in the class names.

    `split` names a subfolder (`root/train/`, `root/val/`, ...). `split=None` or `"all"` uses the whole
    folder as one split. A split that has no subfolder is refused: using the whole folder for it would
    train and evaluate on the same images without a word.
    """

    def __init__(self, root: str | Path, split: str | None = None, transform=None, skip_bad_images: bool = False):
        super().__init__(transform, skip_bad_images)
        root = Path(root).resolve()
        if not root.is_dir():
            raise MissingInputError(f"image folder {root} does not exist")
        self.data_dir = top = root
        if split not in (None, "all"):
            if not (root / split).is_dir():
                subdirs = sorted(d.name for d in root.iterdir() if d.is_dir())
                raise UsageError(
                    f"image folder {root} has no {split}/ subfolder (it holds {subdirs[:5]}"
                    f"{' ...' if len(subdirs) > 5 else ''}); split it into {root}/train/ and {root}/val/, or pass "
                    "split='all' (--split all) to use the whole folder as one split")
            root = root / split
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
        check_names(class_dirs, "class folder")
        self.paths, labels = [], []
        for ci, d in enumerate(class_dirs):
            files = sorted((p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: _natural_key(str(p)))
            self.paths += files
            labels += [ci] * len(files)
        if not self.paths:
            raise MissingInputError(f"no images found in {root} (expected {root}/<class>/<image>.jpg)")
        check_names(self.paths)
        self.classnames = [d.name.replace("_", " ") for d in class_dirs]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.dataset_id, self.split = f"imagefolder:{top.name}", split or "all"

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self.paths[i])

    def describe(self, i: int) -> str:
        return str(self.paths[i])


# The CIFAR-100 python release is a set of pickles (as torchvision reads them). A pickle can name any Python
# callable to run while it is read, so: the folder may hold only the release's own files, and they are read
# with an unpickler that resolves nothing but the numpy array and scalar constructors the release uses.
CIFAR_RELEASE_FILES = frozenset({"train", "test", "meta", "file.txt~"})
CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-100 release file never does")
        return super().find_class(module, name)


def check_cifar_folder(root: Path) -> None:
    """Refuse a `cifar-100-python` folder holding anything but the release's own files."""
    extra = sorted(p.name for p in root.iterdir() if p.name not in CIFAR_RELEASE_FILES)
    if extra:
        raise InputError(f"{root} holds files that are not part of the CIFAR-100 python release ({', '.join(extra[:5])}); "
                         f"the folder may hold only {', '.join(sorted(CIFAR_RELEASE_FILES))}")


def load_cifar_pickle(path: Path) -> dict:
    """One release file (`train` / `test`), read without resolving anything but numpy's array constructors."""
    try:
        with open_regular_file(path) as fh:  # a FIFO named train: refused, not waited on
            d = _CifarUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise InputError(f"{path} is not a CIFAR-100 release file ({e})") from None
    if not isinstance(d, dict) or "data" not in d or "fine_labels" not in d:
        raise InputError(f"{path} is not a CIFAR-100 release file (no 'data' and 'fine_labels')")
    return d


class Cifar100Pickle(ImageDataset):
    """The python pickle release (`cifar-100-python/{train,test,meta}`), read safely (see `load_cifar_pickle`)."""

    def __init__(self, root: str | Path, split: str = "test", transform=None, skip_bad_images: bool = False):
        super().__init__(transform, skip_bad_images)
        root = Path(root).resolve()
        if (root / "cifar-100-python").is_dir():
            root = root / "cifar-100-python"
        self.data_dir = root
        split = {"val": "test"}.get(split, split)
        f = root / split
        if split not in ("train", "test") or not f.is_file():
            raise MissingInputError(f"CIFAR-100 split {split!r} not found: expected {f} ('train' or 'test')")
        check_cifar_folder(root)
        d = load_cifar_pickle(f)
        self.images_NHWC = d["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.labels = np.asarray(d["fine_labels"], dtype=np.int64)
        self.classnames = classnames_for("cifar100")
        self.dataset_id, self.split = "cifar100", split

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images_NHWC[i])


# ---------------------------------------------------------------------------------- Hugging Face Hub
class HubImageDataset(ImageDataset):
    """A Hugging Face `datasets` split with an image column and a ClassLabel column.

    Needs network access (or a populated HF cache with `HF_DATASETS_OFFLINE=1`) the first time.
    """

    def __init__(self, hf_dataset: Any, dataset_id: str, split: str, image_column: str | None = None,
                 label_column: str | None = None, classnames: list[str] | None = None, transform=None,
                 skip_bad_images: bool = False):
        super().__init__(transform, skip_bad_images)
        features = hf_dataset.features
        self.image_column = image_column or _find_column(features, "Image", dataset_id)
        self.label_column = label_column or _find_column(features, "ClassLabel", dataset_id)
        self.ds = hf_dataset
        self.labels = np.asarray(hf_dataset[self.label_column], dtype=np.int64)
        if classnames is None:
            names = getattr(features[self.label_column], "names", None)
            if names is None:
                raise UsageError(f"{dataset_id}: label column {self.label_column!r} has no class names; pass classnames=")
            classnames = [n.replace("_", " ") for n in names]
        self.classnames = classnames
        self.dataset_id, self.split = dataset_id, split
        if len(self.labels) == 0:
            raise UsageError(f"{dataset_id} split {split!r} is empty")

    def load_image(self, i: int) -> Image.Image:
        try:
            img = self.ds[i][self.image_column]
            if isinstance(img, Image.Image):
                return to_rgb(img)
            with open_regular_file(img["path"]) as f, Image.open(f) as im:  # a FIFO: refused, not waited on
                im.load()
                return to_rgb(im)
        except Exception as e:
            raise BadImageError(f"cannot read image {i} of {self.dataset_id}/{self.split}: {e}") from e


def _find_column(features: Any, kind: str, dataset_id: str) -> str:
    for name, feat in features.items():
        if type(feat).__name__ == kind:
            return name
    raise UsageError(f"{dataset_id}: no {kind} column among {list(features)}; name it explicitly")


def load_hub_dataset(name: str, split: str, transform=None, skip_bad_images: bool = False, **load_kwargs: Any) -> HubImageDataset:
    """Load a known data set (`cifar100`, `tiny-imagenet`, `cub200`) or any `owner/repo` from the Hub."""
    import datasets

    spec = HUB_DATASETS.get(name)
    repo = spec["repo"] if spec else name
    hub_split = spec["splits"].get(split, split) if spec else split
    check_hub_dataset_available(name, repo)  # offline and not cached: one line now, not a minute of retries
    try:
        ds = datasets.load_dataset(repo, split=hub_split, **load_kwargs)
    except ValueError as e:  # datasets raises ValueError for an unknown split
        raise UsageError(f"{repo}: cannot load split {hub_split!r}: {e}") from e
    out = HubImageDataset(
        ds, dataset_id=name if spec else repo, split=split,
        image_column=spec["image"] if spec else None, label_column=spec["label"] if spec else None,
        classnames=_hub_classnames(name, ds, spec) if spec else None,
        transform=transform, skip_bad_images=skip_bad_images,
    )
    out.hub_repo = repo
    return out


def _hub_classnames(name: str, ds: Any, spec: dict[str, Any]) -> list[str]:
    if name == "tiny-imagenet":  # zh-plus/tiny-imagenet's ClassLabel names are wnids
        table = classnames_for("tiny-imagenet")
        return [table[w] for w in ds.features[spec["label"]].names]
    return classnames_for(name)


def _natural_key(s: str) -> list[Any]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
