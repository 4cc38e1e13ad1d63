"""The six OOD data sets: each loader on an offline replica of its CLIP-benchmark WebDataset repo in a
temporary HF cache (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, in a subprocess so the variables take
effect at import), and the unknown-data-set error."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from sae_lens_vision_steer import load_image_dataset
from sae_lens_vision_steer.data.ood import OOD_DATASETS, clip_benchmark_templates

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _sample_bytes(colour: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 10, 3), colour, np.uint8)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def write_replica(cache, repo: str, classnames: list[str], templates: list[str], splits: dict[str, list[list[int]]]):
    """`datasets--<owner>--<name>/snapshots/<commit>/` with classnames, templates and per split shards of
    `(label)` samples, as clip_benchmark's exporter writes them (`<key>.webp`, `<key>.cls`)."""
    repo_dir = cache / ("datasets--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (snap / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    key = 0
    for split, shards in splits.items():
        (snap / split).mkdir()
        (snap / split / "nshards.txt").write_text(str(len(shards)))
        for i, labels in enumerate(shards):
            with tarfile.open(snap / split / f"{i}.tar", "w") as tar:
                for y in labels:
                    for ext, data in (("webp", _sample_bytes(20 * y + 10)), ("cls", str(y).encode())):
                        info = tarfile.TarInfo(f"s{key:07d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    key += 1
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)


SCRIPT = r"""
import json, sys
from sae_lens_vision_steer import load_image_dataset
out = {}
for name, split in json.loads(sys.argv[1]):
    try:
        ds = load_image_dataset(name, split, transform=lambda im: list(im.convert("RGB").getpixel((0, 0))))
        out[f"{name}/{split}"] = {"id": ds.dataset_id, "repo": ds.hub_repo, "split": ds.split, "n": len(ds),
                                  "classnames": ds.classnames, "templates": ds.prompt_templates,
                                  "labels": ds.labels.tolist(), "pixels": [ds[i][0] for i in range(len(ds))]}
    except Exception as e:
        out[f"{name}/{split}"] = {"error": type(e).__name__ + ": " + str(e)}
import sae_lens_vision_steer.data.ood as ood
ood.OOD_DATASETS["food101"] = "clip-benchmark/wds_not_in_the_cache"
try:
    load_image_dataset("food101", "val")
except Exception as e:
    out["not-cached"] = {"error": type(e).__name__ + ": " + str(e)}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # an offline-Hub load or an accuracy check on real images (the slow tier)
def test_six_loaders_offline_on_replicas(tmp_path):
    cache = tmp_path / "hub"
    expected = {}
    for j, (name, repo) in enumerate(OOD_DATASETS.items()):
        names = [f"{name} class {c}" for c in range(4)]
        templates = [f"a photo of a {{c}}, type {j}.", "itap of the {c}."]
        test = [[3, 0, 2], [1]]  # two shards: label order across shards is kept
        splits = {"test": test} if name == "sun397" else {"test": test, "train": [[2, 2, 1, 0]]}
        write_replica(cache, repo, names, templates, splits)
        expected[name] = (repo, names, templates)
    eurosat_train = cache / "datasets--clip-benchmark--wds_vtab-eurosat" / "snapshots" / COMMIT / "train"
    (eurosat_train / "nshards.txt").write_text("2")  # 1.tar is not in the cache
    requests = [[n, "val"] for n in OOD_DATASETS] + [["food101", "train"], ["sun397", "train"], ["eurosat", "train"],
                                                     ["Flowers", "test"], ["fgvc-aircraft", "val"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "HF_HOME": str(tmp_path / "home"), "HF_DATASETS_CACHE": str(tmp_path / "ds_cache")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(requests)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, (repo, names, templates) in expected.items():
        r = got[f"{name}/val"]
        assert "error" not in r, r
        assert (r["id"], r["repo"], r["split"], r["n"]) == (name, repo, "val", 4)
        assert r["classnames"] == names  # classnames.txt line order = label order
        assert r["templates"] == [t.replace("{c}", "{}") for t in templates]
        assert r["labels"] == [3, 0, 2, 1]
        assert [p[0] for p in r["pixels"]] == [20 * y + 10 for y in r["labels"]]  # the image of each label
    assert got["food101/train"]["labels"] == [2, 2, 1, 0]
    assert "has no split 'train'; it has ['test']" in got["sun397/train"]["error"]
    assert got["Flowers/test"]["id"] == "flowers102" and got["fgvc-aircraft/val"]["id"] == "aircraft"
    err = got["eurosat/train"]["error"]
    assert "shards ['1.tar']" in err and "HF cache" in err
    assert got["not-cached"]["error"].startswith("FileNotFoundError: cannot get clip-benchmark/wds_not_in_the_cache")


def test_unknown_dataset_lists_the_supported_ones():
    with pytest.raises(ValueError) as e:
        load_image_dataset("imagenet-sketchy", "val")
    msg = str(e.value)
    assert "unknown dataset 'imagenet-sketchy'" in msg and "\n" not in msg
    for name in ("cifar100", "tiny-imagenet", "cub200", *OOD_DATASETS):
        assert name in msg


def test_templates_conversion():
    assert clip_benchmark_templates(["a {c} with {braces}."]) == ["a {} with {{braces}}."]
    assert clip_benchmark_templates(["a {c}."])[0].format("cat") == "a cat."
    with pytest.raises(ValueError, match="no {c} placeholder"):
        clip_benchmark_templates(["a photo."])
