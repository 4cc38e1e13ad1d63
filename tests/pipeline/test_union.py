"""Union of data sets (union.py, union_eval.py): one cache over several training splits with per-row
data-set ids, an SAE trained on it, the FVU gate calibrated on the union, evaluation per data set."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP_KWARGS, make_tiny_clip, write_image_folder

from sae_lens_vision_steer.activation_cache import CacheMismatchError, cache_activations
from sae_lens_vision_steer.activation_cache.union import cache_dataset_names, check_caches_agree, member_rows
from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.cli.common import EXIT_INPUT, EXIT_USAGE
from sae_lens_vision_steer.data import load_image_dataset
from sae_lens_vision_steer.data.union import UnionMismatchError, load_union_dataset
from sae_lens_vision_steer.training.gate import fvu_threshold_from_reference, union_fvu_threshold
from sae_lens_vision_steer.training.trainer import train_sae

HOOK = "blocks.1.hook_resid_post"
N_CIFAR = 10  # training images of the CIFAR-100 replica (a multiple of BATCH: the batch grids line up)
BATCH = 5


def _write_cifar(root: Path, n_train: int = N_CIFAR, n_test: int = 6) -> Path:
    """The CIFAR-100 python release's layout (`cifar-100-python/{train,test}`), random pixels."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        data = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(rng.integers(0, 100, n))}
        (d / split).write_bytes(pickle.dumps(data))
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("union_data")
    cifar = _write_cifar(root / "cifar")
    alpha = root / "alpha"
    write_image_folder(alpha / "train", n_classes=3, per_class=4)  # 12 images
    write_image_folder(alpha / "val", n_classes=3, per_class=2, seed=3)
    return {"cifar": cifar, "alpha": alpha, "dirs": f"{cifar},{alpha}"}


@pytest.fixture(scope="module")
def caches(data, tiny_clip, tmp_path_factory):
    """Each member's own cache, and the union's (other shard size: the boundaries fall elsewhere)."""
    out = tmp_path_factory.mktemp("union_caches")
    kw = dict(dtype="float32", batch_size=BATCH, num_workers=0, show_progress=False)
    single = [cache_activations(tiny_clip, load_image_dataset(name, "train", d, tiny_clip.preprocess), HOOK,
                                out / name, shard_size=4, **kw)
              for name, d in (("cifar100", data["cifar"]), ("imagefolder", data["alpha"]))]
    union = load_image_dataset("cifar100,imagefolder", "train", data["dirs"], tiny_clip.preprocess)
    return single, cache_activations(tiny_clip, union, HOOK, out / "union", shard_size=7, **kw)


def test_union_cache_is_the_concatenation_of_member_caches(caches):
    (c1, c2), u = caches
    assert torch.equal(u.load(), torch.cat([c1.load(), c2.load()]))
    assert np.array_equal(u.labels, np.concatenate([c1.labels, c2.labels]))  # labels stay per member
    assert np.array_equal(u.image_index, np.concatenate([c1.image_index, c2.image_index + N_CIFAR]))
    assert np.array_equal(u.dataset_ids(), np.repeat([0, 1], [c1.n_rows, c2.n_rows]))
    assert np.array_equal(member_rows(u, "imagefolder:alpha"), np.arange(c1.n_rows, u.n_rows))
    assert not c1.dataset_ids().any() and "members" not in c1.metadata["request"]  # a single cache: unchanged
    assert u.metadata["dataset"] == "cifar100+imagefolder:alpha" and u.metadata["split"] == "train"
    members = u.metadata["request"]["members"]
    assert cache_dataset_names(u) == ["cifar100", "imagefolder:alpha"]
    assert [m["first_image"] for m in members] == [0, N_CIFAR]
    assert [m["n_images"] for m in members] == [c1.metadata["n_images"], c2.metadata["n_images"]]
    assert [m["dataset_fingerprint"] for m in members] == [c["request"]["dataset_fingerprint"]
                                                           for c in (c1.metadata, c2.metadata)]


def test_union_cache_stats_are_float64_stats_of_all_rows(caches):
    _, u = caches
    x = u.load().double().numpy()
    s = u.stats(HOOK)
    mean = x.mean(0)
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(s["mean"], mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s["mean_norm"], norms.mean(), rtol=1e-10)
    np.testing.assert_allclose(s["mean_sq_dist_to_mean"], ((x - mean) ** 2).sum(1).mean(), rtol=1e-8)
    assert s["max_abs"] == pytest.approx(np.abs(x).max(), rel=1e-12)


@pytest.fixture(scope="module")
def union_sae(caches, tmp_path_factory):
    _, u = caches
    out = tmp_path_factory.mktemp("union_sae") / "sae"
    # buffer_size: the default mixing buffer (32768 rows) would read this 22-row cache ~1500 times to fill
    return train_sae(u, HOOK, k=4, expansion_factor=2, batch_size=8, total_training_samples=160, device="cpu",
                     buffer_size=64, out_dir=out, holdout_fraction=0.2, n_checkpoints=0, show_progress=False)


def _fvu(sae, x):  # written out: ||x - sae(x)||^2 / ||x - mu||^2 with the SAE's recorded training mean
    with torch.no_grad():
        rec = sae.decode(sae.encode(x))
    mu = torch.tensor(sae.cfg.metadata["activation_mean"])
    return ((x - rec).double().pow(2).sum(1) / (x - mu).double().pow(2).sum(1)).numpy()


def test_sae_on_the_union_records_every_member(union_sae, caches):
    meta = union_sae.sae.cfg.metadata
    assert meta["dataset"] == "cifar100+imagefolder:alpha"
    assert [(m["dataset"], m["split"], m["n_images"]) for m in meta["dataset_members"]] == [
        ("cifar100", "train", N_CIFAR), ("imagefolder:alpha", "train", 12)]
    from sae_lens_vision_steer.hub.model_card import sae_card_section
    from sae_lens_vision_steer.sae.metadata import portable_metadata, vision_metadata

    assert portable_metadata(vision_metadata(union_sae.sae))["dataset_members"] == meta["dataset_members"]

    card = sae_card_section("me/saes", "union", {"d_in": 64, "d_sae": 128, "k": 4, "architecture": "topk"}, meta)
    assert "union of 2 data sets: `cifar100` (split `train`, 10 images), `imagefolder alpha`" in card


def test_gate_calibrated_on_the_union_is_the_quantile_of_its_fvus(union_sae, caches):
    (c1, c2), u = caches
    sae = union_sae.sae
    fvu = _fvu(sae, u.load())
    tau, info = union_fvu_threshold(sae, u, 0.9)
    assert tau == pytest.approx(np.quantile(fvu, 0.9), rel=1e-6)
    assert info["rows_per_dataset"] == {"cifar100": c1.n_rows, "imagefolder:alpha": c2.n_rows}
    assert tau == pytest.approx(fvu_threshold_from_reference(sae, u.root, 0.9), rel=1e-9)
    # one member only (the paper calibrates its generalized SAE on part of the union)
    tau1, _ = union_fvu_threshold(sae, u, 0.9, datasets=["cifar100"])
    assert tau1 == pytest.approx(np.quantile(fvu[:c1.n_rows], 0.9), rel=1e-6)
    # the members' own caches, given as one union of references
    tau2, _ = union_fvu_threshold(sae, f"{c1.root},{c2.root}", 0.9)
    assert tau2 == pytest.approx(tau, rel=1e-6)


def test_eval_writes_one_table_per_data_set_and_a_summary(union_sae, caches, data, tmp_path, capsys):
    _, u = caches
    common = ["--random-weights", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu",
              "--sae", str(union_sae.out_dir), "--methods", "zeroshot,vs2", "--templates", "single",
              "--num-workers", "0", "--no-progress", "--no-plots", "--split", "val"]
    out = tmp_path / "ev"
    rc = main(["eval", *common, "--dataset", "cifar100,imagefolder", "--data-dir", data["dirs"], "--out", str(out),
               "--fvu-quantile", "0.9", "--reference-cache", str(u.root), "--gate-datasets", "cifar100"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["datasets"] == ["cifar100", "imagefolder:alpha"]
    per = {n: json.loads((out / f / "results.json").read_text()) for n, f in summary["folders"].items()}
    assert len(per["cifar100"]["classnames"]) == 100 and per["cifar100"]["config"]["n_images"] == 6
    assert per["imagefolder:alpha"]["classnames"] == ["class 0", "class 1", "class 2"]
    assert per["imagefolder:alpha"]["config"]["n_images"] == 6
    for n, res in per.items():
        assert res["config"]["gate_datasets"] == ["cifar100"]
        assert summary["methods"]["vs2"][n]["top1"] == res["methods"]["vs2"]["top1"]
    assert (out / "summary.md").read_text().count("\n") == 4  # header, rule, zeroshot, vs2
    # a member's table equals evaluating that data set alone
    alone = tmp_path / "alone"
    assert main(["eval", *common, "--dataset", "imagefolder", "--data-dir", str(data["alpha"]), "--out", str(alone),
                 "--fvu-threshold", str(per["cifar100"]["config"]["fvu_threshold"])]) == 0
    single = json.loads((alone / "results.json").read_text())
    assert "union" not in single["config"]
    for m in ("zeroshot", "vs2"):
        assert single["methods"][m]["per_class_acc"] == per["imagefolder:alpha"]["methods"][m]["per_class_acc"]


def test_limit_is_per_member(data, tiny_clip):
    u = load_union_dataset(["cifar100", "imagefolder"], "train", data["dirs"], tiny_clip.preprocess, limit=4)
    assert [len(m) for m in u.members] == [4, 4] and len(u) == 8
    assert list(u.offsets) == [0, 4, 8]
    x, y, i = u[5]  # the second image of the second member
    assert i == 5 and y == u.members[1].label(1)
    with pytest.raises(ValueError, match="union of data sets with their own classes"):
        u.classnames


def test_bad_unions_are_refused(data, tiny_clip, caches, tmp_path):
    pre = tiny_clip.preprocess
    with pytest.raises(ValueError, match="unknown dataset 'nosuch'; supported: cifar100"):
        load_image_dataset("cifar100,nosuch", "train", f"{data['cifar']},")
    with pytest.raises(ValueError, match="given twice"):
        load_image_dataset("cifar100,cifar-100", "train")
    with pytest.raises(ValueError, match="appears twice"):
        load_image_dataset("imagefolder,imagefolder", "train", f"{data['alpha']},{data['alpha']}", pre)
    with pytest.raises(ValueError, match="one folder per member"):
        load_image_dataset("cifar100,imagefolder,cub200", "train", data["dirs"], pre)
    with pytest.raises(UnionMismatchError, match="preprocessed differently"):
        from sae_lens_vision_steer.data.union import UnionImageDataset

        UnionImageDataset([load_image_dataset("cifar100", "train", data["cifar"], pre),
                           load_image_dataset("imagefolder", "train", data["alpha"], None)])
    (c1, _), u = caches
    # caches of another model's weights, or without the hook, cannot be combined
    other = make_tiny_clip(seed=1)
    kw = dict(dtype="float32", batch_size=BATCH, num_workers=0, show_progress=False)
    c_other = cache_activations(other, load_image_dataset("imagefolder", "train", data["alpha"], other.preprocess),
                                HOOK, tmp_path / "other", **kw)
    with pytest.raises(UnionMismatchError, match="model_fingerprint"):
        check_caches_agree([c1, c_other], HOOK)
    c_hook = cache_activations(tiny_clip, load_image_dataset("imagefolder", "train", data["alpha"], pre),
                               "blocks.0.hook_resid_post", tmp_path / "hook0", **kw)
    with pytest.raises(UnionMismatchError, match="hook 'blocks.1.hook_resid_post'"):
        check_caches_agree([c1, c_hook], HOOK)
    with pytest.raises(UnionMismatchError, match="in more than one of the caches"):
        check_caches_agree([c1, u], HOOK)
    # a union cache asked for with other members is refused, naming the difference
    smaller = load_image_dataset("cifar100,imagefolder", "train", data["dirs"], pre, limit=4)
    with pytest.raises(CacheMismatchError, match="n_images: cache has 22, request has 8"):
        cache_activations(tiny_clip, smaller, HOOK, u.root, shard_size=7, **kw)


def test_gate_and_training_refusals(union_sae, caches, capsys):
    _, u = caches
    with pytest.raises(ValueError, match=r"gate data set\(s\) \['cub200'\] are not in the reference"):
        union_fvu_threshold(union_sae.sae, u, 0.9, datasets="cub200")
    rc = main(["train", "--cache", str(u.root), "--objective", "pass", "--out", "unused", "--no-progress"])
    assert rc == EXIT_USAGE and "labels are per data set" in capsys.readouterr().err
    rc = main(["eval", "--sae", str(union_sae.out_dir), "--fvu-quantile", "0.9", "--reference-cache",
               f"{u.root},{u.root}_missing", "--dataset", "cifar100"])
    assert rc == EXIT_INPUT and "_missing does not exist" in capsys.readouterr().err


def test_training_batches_mix_both_members(caches):
    """Training on a union cache needs nothing special: one epoch of the trainer's stream holds rows of
    every member (shards visited in random order, rows mixed in SAELens' buffer)."""
    from sae_lens_vision_steer.training.batches import activation_batches

    (c1, _), u = caches
    x = u.load()
    got = torch.cat(list(activation_batches(u, HOOK, 4, epochs=1, buffer_size=16, seed=0)))
    rows = [int(torch.nonzero((x == r).all(1))[0]) for r in got]
    assert len(set(rows)) == len(rows) == 20  # 22 rows: five full batches of 4, each row at most once
    ids = u.dataset_ids()[rows]
    assert 0 < (ids == 0).sum() < len(rows)


@pytest.mark.slow  # ~20 s on 2 cores: the trainer's default 32768-row mixing buffer re-reads the 22-row cache
def test_run_with_a_union_trains_one_sae_and_evaluates_each_data_set(data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--random-weights", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu",
               "--dataset", "cifar100,imagefolder", "--data-dir", data["dirs"], "--k", "4", "--expansion", "2",
               "--epochs", "2", "--train-batch-size", "8", "--sae-holdout-fraction", "0.2", "--templates", "single",
               "--methods", "zeroshot,vs2", "--fvu-quantile", "0.9", "--gate-datasets", "cifar100",
               "--num-workers", "0", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["cache_rows"] == N_CIFAR + 12
    assert set(run["fvu_distribution"]["per_dataset"]) == {"cifar100", "imagefolder:alpha"}
    assert run["fvu_distribution"]["per_dataset"]["cifar100"]["n_rows"] == N_CIFAR
    summary = json.loads((out / "summary.json").read_text())
    for name, folder in summary["folders"].items():
        res = json.loads((out / folder / "results.json").read_text())
        assert res["config"]["dataset"] == name and res["config"]["fvu_threshold"] == run["fvu_threshold"]
    assert not (out / "results.json").exists()


def test_retrieval_methods_refuse_a_union_pool(union_sae, caches, data, tiny_clip):
    from sae_lens_vision_steer.evaluation.union import evaluate_members

    _, u = caches
    val = load_union_dataset("cifar100,imagefolder", "val", data["dirs"], tiny_clip.preprocess)
    with pytest.raises(ValueError, match="vs2pp retrieve from the pool cache .* a union of data sets"):
        evaluate_members(tiny_clip, val.members, union_sae.sae, ["zeroshot", "vs2pp"], show_progress=False,
                         options={"pool_cache": str(u.root)})


def test_cache_cli_with_a_union_writes_the_same_cache(caches, data, tmp_path, capsys):
    _, u = caches
    rc = main(["cache", "--random-weights", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu",
               "--dataset", "cifar100,imagefolder",
               "--data-dir", f"imagefolder={data['alpha']},cifar100={data['cifar']}",
               "--split", "train", "--hook", HOOK, "--dtype", "float32", "--batch-size", str(BATCH),
               "--shard-size", "7", "--num-workers", "0", "--no-progress", "--out", str(tmp_path / "c")])
    assert rc == 0, capsys.readouterr().err
    assert "member imagefolder:alpha/train: 12 images from image 10" in capsys.readouterr().out
    from sae_lens_vision_steer.activation_cache import ActivationStore

    c = ActivationStore.open(tmp_path / "c")
    assert [s["sha256"] for s in c.metadata["shards"]] == [s["sha256"] for s in u.metadata["shards"]]
