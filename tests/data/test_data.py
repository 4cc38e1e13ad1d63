import pickle
import re

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

from sae_lens_vision_steer.data import load_image_dataset, make_loader
from sae_lens_vision_steer.data.base import BadImageError
from sae_lens_vision_steer.data.resources import classnames_for, templates_for


def test_shipped_classnames():
    cifar, cub, tin = classnames_for("cifar100"), classnames_for("cub200"), classnames_for("tiny-imagenet")
    assert (len(cifar), len(cub), len(tin)) == (100, 200, 200)
    for names in (cifar, cub, list(tin.values())):
        assert len(set(names)) == len(names)
        for n in names:
            assert "_" not in n and n == n.strip() and "  " not in n and re.fullmatch(r"[\w' ./&-]+", n), n
    assert cifar[:3] == ["apple", "aquarium fish", "baby"] and cifar[-1] == "worm"
    assert cub[0] == "Black-footed Albatross" and cub[-1] == "Common Yellowthroat"
    assert tin["n01443537"] == "goldfish"


def test_templates():
    assert [len(templates_for(t)) for t in ("cifar", "imagenet", "cub", "single")] == [18, 80, 1, 1]
    assert templates_for("single") == ["a photo of a {}."]
    assert templates_for("cifar100") == templates_for("cifar")
    assert all(t.count("{}") == 1 for t in templates_for("imagenet"))


def test_tiny_imagenet_wnids_cover_shipped_names(tiny_imagenet_dir):
    wnids = (tiny_imagenet_dir / "wnids.txt").read_text().split()
    assert set(wnids) == set(classnames_for("tiny-imagenet"))


def test_image_folder_converts_modes(tmp_path, tiny_clip):
    write_image_folder(tmp_path / "imgs", n_classes=3, per_class=4)
    ds = load_image_dataset("imagefolder", data_dir=tmp_path / "imgs", transform=tiny_clip.preprocess)
    assert len(ds) == 12 and ds.classnames == ["class 0", "class 1", "class 2"]
    batch = next(iter(make_loader(ds, batch_size=12, num_workers=0)))
    assert batch.images.shape == (12, 3, 32, 32)
    assert batch.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    raw = load_image_dataset("imagefolder", data_dir=tmp_path / "imgs")
    assert {raw[i][0].mode for i in range(12)} == {"RGB"}  # L, RGBA and CMYK sources all became RGB


def test_corrupt_image_named_or_skipped(tmp_path, tiny_clip):
    root = write_image_folder(tmp_path / "imgs", n_classes=2, per_class=3)
    bad = root / "class_1" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = load_image_dataset("imagefolder", data_dir=root, transform=tiny_clip.preprocess)
    with pytest.raises(BadImageError, match="zz_broken.png"):
        list(make_loader(ds, batch_size=4, num_workers=0))
    ds = load_image_dataset("imagefolder", data_dir=root, transform=tiny_clip.preprocess, skip_bad_images=True)
    batches = list(make_loader(ds, batch_size=4, num_workers=0))
    assert sum(b.n_skipped for b in batches) == 1 and sum(len(b.labels) for b in batches) == 6


def test_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_dataset("imagefolder", data_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset("imagefolder", data_dir=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a Tiny-ImageNet"):
        load_image_dataset("tiny-imagenet", data_dir=tmp_path / "empty")


def test_cifar100_pickle(tmp_path, tiny_clip):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (5, 3072), dtype=np.uint8)
    with open(root / "test", "wb") as f:
        pickle.dump({"data": data, "fine_labels": [0, 5, 99, 3, 3]}, f)
    ds = load_image_dataset("cifar100", split="test", data_dir=tmp_path, transform=None)
    assert len(ds) == 5 and ds.classnames[99] == "worm"
    img, label, _ = ds[1]
    assert label == 5 and img.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(img)[..., 0], data[1, :1024].reshape(32, 32))
    with pytest.raises(FileNotFoundError, match="split 'train' not found"):
        load_image_dataset("cifar100", split="train", data_dir=tmp_path)


def test_hub_dataset_wrapping_without_network(tiny_clip):
    """The Hub path minus the download: a `datasets.Dataset` built in memory."""
    import datasets

    imgs = [Image.fromarray(np.full((20, 20), v, np.uint8)) for v in (0, 100, 200)]  # greyscale
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a_b", "c"])})
    hf = datasets.Dataset.from_dict({"img": imgs, "fine_label": [1, 0, 1]}, features=features)
    from sae_lens_vision_steer.data.base import HubImageDataset

    ds = HubImageDataset(hf, "toy", "train", transform=tiny_clip.preprocess)
    assert ds.classnames == ["a b", "c"] and ds.image_column == "img" and ds.labels.tolist() == [1, 0, 1]
    x, y, _ = ds[2]
    assert x.shape == (3, 32, 32) and y == 1


def test_tiny_imagenet_real_images(tiny_imagenet_dir, tiny_clip):
    val = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=200)
    assert len(val) == 200 and len(val.classnames) == 200
    ann = dict(line.split("\t")[:2] for line in (tiny_imagenet_dir / "val" / "val_annotations.txt").read_text().splitlines())
    wnids = (tiny_imagenet_dir / "wnids.txt").read_text().split()
    for idx in (0, 57, 199):  # labels agree with the annotation file
        path = val.paths[val.indices[idx]]
        assert val.label(idx) == wnids.index(ann[path.name])
    batches = list(make_loader(val, batch_size=64, num_workers=2))
    images = torch.cat([b.images for b in batches])
    assert images.shape == (200, 3, 32, 32) and torch.isfinite(images).all()
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(200))  # order kept with workers
    train = load_image_dataset("tiny-imagenet", "train", tiny_imagenet_dir, limit=400)
    assert len(np.unique(train.subset_labels)) == 200  # evenly spaced subset covers every class
    with pytest.raises(ValueError, match="split must be"):
        load_image_dataset("tiny-imagenet", "test", tiny_imagenet_dir)


def test_tiny_imagenet_greyscale_val_image_is_rgb(tiny_imagenet_dir):
    val = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir)
    grey = next(i for i in range(200) if Image.open(val.paths[i]).mode == "L")
    assert val[grey][0].mode == "RGB"
