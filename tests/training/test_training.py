"""SAE training on a cache of real images: held-out FVU checked independently, reload, determinism, resume."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from sae_lens import SAE, SAETrainer, TopKSAE
from safetensors.torch import load_file

from sae_lens_vision_steer.activation_cache import ActivationStore, cache_activations
from sae_lens_vision_steer.cli.common import EXIT_CONFLICT, EXIT_INPUT, EXIT_USAGE  # noqa: F401
from sae_lens_vision_steer.data import load_image_dataset
from sae_lens_vision_steer.sae.metadata import VISION_METADATA_KEYS, check_sae_fits_hook
from sae_lens_vision_steer.training.config import PAPER_PRESETS
from sae_lens_vision_steer.training.trainer import (
    activation_batches,
    fvu_distribution,
    holdout_split,
    per_sample_fvu_on_cache,
    train_sae,
)

HOOK = "blocks.1.hook_resid_post"
SMALL = dict(k=16, expansion_factor=4, batch_size=64, show_progress=False)


@pytest.fixture(scope="module")
def cache(tiny_clip, tiny_imagenet_dir, tmp_path_factory) -> ActivationStore:
    ds = load_image_dataset("tiny-imagenet", "train", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=2000)
    return cache_activations(tiny_clip, ds, HOOK, tmp_path_factory.mktemp("cache"), batch_size=128, num_workers=0,
                             shard_size=512, show_progress=False)


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    return train_sae(cache.root, epochs=8, out_dir=tmp_path_factory.mktemp("sae") / "sae", **SMALL)


def reconstruct(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Top-k SAE written out: codes = ReLU(top-k of (x - b_dec) W_enc + b_enc); x_rec = codes W_dec + b_dec."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(sae.cfg.k, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    return codes @ sae.W_dec + sae.b_dec, codes


def test_heldout_fvu_well_below_mean_baseline(trained, cache):
    sae, m = trained.sae, trained.metrics
    train_rows, held_rows = holdout_split(cache, 0.1, 0)
    assert len(held_rows) == 200 and len(np.intersect1d(train_rows, held_rows)) == 0
    x = cache.load(HOOK, rows=held_rows)
    with torch.no_grad():
        rec, codes = reconstruct(sae, x)
    fvu = float(((x - rec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())  # the mean predictor has FVU 1
    assert fvu == pytest.approx(m["heldout_fvu"], rel=1e-4)
    assert fvu < 0.4
    assert sae.cfg.metadata.heldout_fvu == pytest.approx(fvu, rel=1e-4)
    l0 = float((codes != 0).sum(-1).double().mean())
    assert m["heldout_mean_l0"] == pytest.approx(l0) and 0 < l0 <= 16
    assert 0 <= m["dead_fraction"] < 0.5 and m["n_training_samples"] == m["n_training_steps"] * 64


def test_closing_evaluation_on_a_bounded_sample(trained, cache):
    """`eval_rows` bounds the closing evaluation: the held-out FVU is the formula on the rows drawn, and the
    metadata says how many rows of how many (the default, 50,000, covers this whole store)."""
    from sae_lens_vision_steer.training.fvu import evaluate_sae_on_cache, sample_rows

    train_rows, held_rows = holdout_split(cache, 0.1, 0)
    assert trained.metrics["evaluation"]["train_rows"] == trained.metrics["evaluation"]["train_rows_total"] == 1800
    assert trained.sae.cfg.metadata.evaluation["heldout_rows"] == 200
    train_mask, held_mask = (np.isin(np.arange(cache.n_rows), r) for r in (train_rows, held_rows))
    m = evaluate_sae_on_cache(trained.sae, cache, HOOK, train_mask, held_mask, max_rows=50, seed=3)
    ev = m["evaluation"]
    assert (ev["train_rows"], ev["train_rows_total"], ev["heldout_rows"], ev["heldout_rows_total"]) == (50, 1800, 50, 200)
    assert "50 training rows drawn at random" in ev["dead_fraction_from"]
    drawn = sample_rows(held_mask, 50, 4)  # held-out rows: seed + 1
    assert len(drawn) == 50 and set(drawn) <= set(held_rows.tolist())
    x = cache.load(HOOK, rows=drawn)
    with torch.no_grad():
        rec, _ = reconstruct(trained.sae, x)
    fvu = float(((x - rec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert m["heldout_fvu"] == pytest.approx(fvu, rel=1e-4)


def test_saved_sae_loads_with_sae_lens_alone(trained, cache):
    out = trained.out_dir
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk"  # a stock SAELens class: no plugin needed to load it
    sae = SAE.load_from_disk(out)
    assert isinstance(sae, TopKSAE) and (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (64, 256, 16)
    x = cache.load(HOOK, rows=np.arange(0, 2000, 7))
    with torch.no_grad():
        torch.testing.assert_close(sae(x), trained.sae(x), rtol=0, atol=0)
        torch.testing.assert_close(sae(x), reconstruct(sae, x)[0], rtol=1e-5, atol=1e-5)
    meta = sae.cfg.metadata
    for key in VISION_METADATA_KEYS:
        if key not in ("w_aux", "dataset_members", "source"):  # PASS-only, union-only and imported-only keys
            assert key in meta, key
    assert (meta.hook_name, meta.model_name, meta.pretrained, meta.positions) == (HOOK, "ViT-B-32", None, "cls")
    assert (meta.dataset, meta.split, meta.objective) == ("tiny-imagenet", "train", "topk")
    train_rows, _ = holdout_split(cache, 0.1, 0)
    expect_mean = cache.load(HOOK, rows=train_rows).double().mean(0)
    torch.testing.assert_close(torch.tensor(meta.activation_mean, dtype=torch.float64), expect_mean, rtol=0, atol=1e-6)
    sparsity = load_file(out / "sparsity.safetensors")["sparsity"]
    assert sparsity.shape == (256,) and float(sparsity.max()) <= 0
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())
    run = json.loads((out / "training_run.json").read_text())
    assert run["status"] == "complete" and not (out / "checkpoints").exists()


def test_fvu_distribution_matches_per_sample_formula(trained, cache):
    sae = trained.sae
    rows = np.array([1999, 5, 300, 5])
    x = cache.load(HOOK, rows=rows)
    mu = torch.tensor(sae.cfg.metadata.activation_mean)
    with torch.no_grad():
        expect = ((x - reconstruct(sae, x)[0]) ** 2).sum(-1) / ((x - mu) ** 2).sum(-1)
    np.testing.assert_allclose(per_sample_fvu_on_cache(sae, cache, rows=rows), expect.numpy(), rtol=1e-4)
    all_fvu = per_sample_fvu_on_cache(sae, cache.root)
    assert all_fvu.shape == (2000,)
    dist = fvu_distribution(sae, cache, quantiles=(0.5, 0.95))
    assert dist["n_rows"] == 2000 and dist["hook_name"] == HOOK
    assert dist["quantiles"][0.95] == pytest.approx(float(np.quantile(all_fvu, 0.95)))
    assert dist["quantiles"][0.5] < dist["quantiles"][0.95]


def test_wrong_width_is_refused(trained, cache, tiny_clip):
    from sae_lens import TopKSAEConfig

    narrow = TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4))
    with pytest.raises(ValueError, match=r"SAE d_in=32 does not match hook 'blocks.1.hook_resid_post' .* width is 64"):
        fvu_distribution(narrow, cache)
    with pytest.raises(ValueError, match="d_in=32"):
        check_sae_fits_hook(narrow, tiny_clip, HOOK)


def test_same_seed_same_weights(cache, tmp_path):
    runs = [train_sae(cache.root, epochs=1, seed=s, out_dir=tmp_path / f"run{i}", n_checkpoints=0, **SMALL)
            for i, s in enumerate([3, 3, 4])]
    w = [load_file(r.out_dir / "sae_weights.safetensors") for r in runs]
    assert w[0].keys() == w[1].keys()
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert not torch.equal(w[0]["W_dec"], w[2]["W_dec"])


class _CrashingTrainer(SAETrainer):
    def step(self, batch):
        if self.n_training_steps == 40:
            raise RuntimeError("simulated crash")
        return super().step(batch)


def test_interrupted_training_resumes_to_the_same_weights(cache, tmp_path):
    kw = dict(epochs=2, n_checkpoints=3, **SMALL)
    whole = train_sae(cache.root, out_dir=tmp_path / "whole", **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae(cache.root, out_dir=tmp_path / "cut", trainer_cls=_CrashingTrainer, **kw)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["1856"]  # 29 steps of 64
    with pytest.raises(ValueError, match="resume=True"):
        train_sae(cache.root, out_dir=tmp_path / "cut", **kw)
    with pytest.raises(ValueError, match="k: saved run has 16, request has 8"):
        train_sae(cache.root, out_dir=tmp_path / "cut", resume=True, **(kw | {"k": 8}))
    resumed = train_sae(cache.root, out_dir=tmp_path / "cut", resume=True, **kw)
    assert resumed.metrics["resumed_from_samples"] == 1856
    a, b = load_file(whole.out_dir / "sae_weights.safetensors"), load_file(resumed.out_dir / "sae_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["heldout_fvu"] == whole.metrics["heldout_fvu"]
    again = train_sae(cache.root, out_dir=tmp_path / "cut", resume=True, **kw)  # finished: returned, not retrained
    assert again.metrics == resumed.metrics


class _CtrlCTrainer(SAETrainer):
    def step(self, batch):
        if self.n_training_steps == 20 and not getattr(self, "_sent", False):
            self._sent = True
            signal.raise_signal(signal.SIGINT)  # as a Ctrl-C: this step finishes, then a checkpoint is saved
        return super().step(batch)


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(cache, tmp_path):
    kw = dict(epochs=1, n_checkpoints=0, **SMALL)
    whole = train_sae(cache.root, out_dir=tmp_path / "whole", **kw)
    with pytest.raises(KeyboardInterrupt):
        train_sae(cache.root, out_dir=tmp_path / "cut", trainer_cls=_CtrlCTrainer, **kw)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == [str(21 * 64)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler put back
    resumed = train_sae(cache.root, out_dir=tmp_path / "cut", resume=True, **kw)
    a, b = load_file(whole.out_dir / "sae_weights.safetensors"), load_file(resumed.out_dir / "sae_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_provider_is_seeded_bounded_and_labelled(cache):
    train_rows, held_rows = holdout_split(cache, 0.1, 0)
    row_of = {cache.load(HOOK, rows=[r])[0].numpy().tobytes(): r for r in range(cache.n_rows)}
    assert len(row_of) == cache.n_rows  # rows are distinct, so a batch row identifies its cache row

    def run(seed, **kw):
        return list(activation_batches(cache, HOOK, 64, rows=train_rows, seed=seed, epochs=1, buffer_size=600, **kw))

    a, b, c = run(0), run(0), run(1)
    assert len(a) == 1800 // 64 and all(x.shape == (64, 64) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    seen = [row_of[v.numpy().tobytes()] for x in a for v in x]
    assert len(set(seen)) == len(seen) and set(seen) <= set(train_rows.tolist())  # no repeats, no held-out rows
    # Shuffled across shards: the first batch already draws from several of the four shards.
    assert len({r // 512 for r in seen[:64]}) >= 2

    labelled = run(0, with_labels=True)
    for (x, y), plain in zip(labelled, a):
        torch.testing.assert_close(x, plain, rtol=0, atol=0)
        rows = [row_of[v.numpy().tobytes()] for v in x]
        np.testing.assert_array_equal(y.numpy(), cache.labels[rows])
        assert y.dtype == torch.int64

    skipped = list(activation_batches(cache, HOOK, 64, rows=train_rows, seed=0, epochs=1, buffer_size=600,
                                      skip_batches=5))
    assert all(torch.equal(x, y) for x, y in zip(skipped, a[5:])) and len(skipped) == len(a) - 5


def test_extension_points_and_bad_arguments(cache, tmp_path):
    with pytest.raises(ValueError, match="TopKTrainingSAEConfig has no fields \\['w_aux'\\]"):
        train_sae(cache.root, out_dir=tmp_path / "a", epochs=1, sae_cfg_kwargs={"w_aux": 0.8}, **SMALL)
    with pytest.raises(KeyError):
        train_sae(cache.root, out_dir=tmp_path / "b", epochs=1, architecture="no-such-sae", **SMALL)
    with pytest.raises(ValueError, match="needs a trainer_cls"):
        train_sae(cache.root, out_dir=tmp_path / "c", epochs=1, with_labels=True, **SMALL)
    with pytest.raises(ValueError, match="not both"):
        train_sae(cache.root, out_dir=tmp_path / "d", epochs=1, total_training_samples=100, **SMALL)
    with pytest.raises(KeyError, match="not in the cache"):
        train_sae(cache.root, "blocks.0.hook_resid_post", out_dir=tmp_path / "e", epochs=1, **SMALL)
    assert PAPER_PRESETS["ViT-B-32"].k == 64 and PAPER_PRESETS["ViT-L-14"].expansion_factor == 10


def test_cli_train_and_resume(cache, tmp_path, capsys):
    from sae_lens_vision_steer.cli import main

    argv = ["train", "--cache", str(cache.root), "--k", "8", "--expansion", "2", "--batch-size", "128",
            "--samples", "2560", "--device", "cpu", "--out", str(tmp_path / "sae"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out FVU" in out and "dead fraction" in out and "samples/s" in out and "peak RSS" in out
    assert SAE.load_from_disk(tmp_path / "sae").cfg.d_sae == 128
    assert main(argv) == EXIT_CONFLICT  # a second run into the same folder needs --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0


def test_train_fraction_is_nested_whole_images_with_the_full_sample_count(cache, tmp_path):
    from sae_lens_vision_steer.sae.metadata import activation_mean
    from sae_lens_vision_steer.training.batches import image_subset

    train_rows, held_rows = holdout_split(cache, 0.1, 0)
    subsets = {f: image_subset(cache, train_rows, f, 0) for f in (0.1, 0.25, 0.5)}
    images = {f: set(cache.image_index[r].tolist()) for f, r in subsets.items()}
    n_images = len(set(cache.image_index[train_rows].tolist()))
    for f, r in subsets.items():
        assert len(images[f]) == round(f * n_images)
        assert set(r.tolist()) == {i for i in train_rows.tolist() if cache.image_index[i] in images[f]}  # whole images
    assert images[0.1] <= images[0.25] <= images[0.5]  # nested
    part = train_sae(cache.root, epochs=1, train_fraction=0.25, out_dir=tmp_path / "part", n_checkpoints=0, **SMALL)
    full = train_sae(cache.root, epochs=1, out_dir=tmp_path / "full", n_checkpoints=0, **SMALL)
    cfg_part = json.loads((part.out_dir / "training_run.json").read_text())["config"]
    cfg_full = json.loads((full.out_dir / "training_run.json").read_text())["config"]
    assert cfg_part["train_fraction"] == 0.25 and cfg_full.get("train_fraction") is None  # old runs still match
    assert cfg_part["total_training_samples"] == cfg_full["total_training_samples"]  # only the data shrinks
    x = cache.load(HOOK).double()
    torch.testing.assert_close(activation_mean(part.sae).double(), x[subsets[0.25]].mean(0), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(activation_mean(part.sae).double(), x[train_rows].mean(0), atol=1e-4)
