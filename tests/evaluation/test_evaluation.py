"""The evaluation runner on real images (tiny random CLIP + Tiny-ImageNet val), checked against
plain and hooked `ZeroShotClassifier.evaluate` passes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP_KWARGS, make_tiny_clip
from PIL import Image
from saes import make_topk_sae

from sae_lens_vision_steer.cli.common import EXIT_CONFLICT, EXIT_INPUT, EXIT_USAGE  # noqa: F401
from sae_lens_vision_steer.data import load_image_dataset
from sae_lens_vision_steer.evaluation import (
    METHODS,
    Evaluator,
    MethodOutput,
    MethodSpec,
    evaluate,
    plot_sweep_heatmap,
    register_method,
    sweep_vs2,
)
from sae_lens_vision_steer.steering import (
    SAEReconstruction,
    VS2Steering,
    per_sample_fvu,
)
from sae_lens_vision_steer.zeroshot.classifier import ZeroShotClassifier

N_IMAGES = 200
BATCH = 64


@pytest.fixture(scope="module")
def setup(tiny_imagenet_dir):
    model = make_tiny_clip(seed=5)
    data = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, model.preprocess, limit=N_IMAGES)
    clf = ZeroShotClassifier(model, data.classnames, "single", show_progress=False)
    plain = clf.evaluate(model, data, batch_size=BATCH, num_workers=0, show_progress=False)
    return model, data, clf, plain


def run_eval(model, data, clf, sae, methods, **kw):
    kw.setdefault("batch_size", BATCH)
    return evaluate(model, data, sae, methods, classifier=clf, num_workers=0, show_progress=False, **kw)


class ImageCounter:
    """Counts images entering block 0: one backbone pass over N images adds N."""

    def __init__(self, model):
        self.model, self.n = model, 0

    def __enter__(self):
        def count(act, hook):
            self.n += act.shape[0]

        # permanent, so that the runner's own `model.hooks(...)` contexts do not remove it
        self.model.add_hook("blocks.0.hook_resid_pre", count, is_permanent=True)
        return self

    def __exit__(self, *exc):
        self.model.reset_hooks(including_permanent=True)


def test_runner_rows_match_plain_and_hooked_passes(setup, tmp_path):
    model, data, clf, plain = setup
    sae = make_topk_sae(seed=1)
    with ImageCounter(model) as counter:
        res = run_eval(model, data, clf, sae,
                       ["zeroshot", "vs2", MethodSpec("vs2_lam0", "vs2", {"lam": 0.0}), "rec_final", "rec_final_gamma"],
                       lam=2.1, gamma=1.5, out_dir=tmp_path)
    assert counter.n == N_IMAGES  # the backbone ran once for five methods
    assert res.timing["n_backbone_passes"] == 1

    zs = res.methods["zeroshot"]
    assert zs.top1 == plain.top1 and zs.top5 == plain.top5 and zs.mean_per_class == plain.mean_per_class
    assert np.array_equal(zs.predictions, plain.predictions)
    np.testing.assert_array_equal(zs.per_class_acc, plain.per_class_acc)
    assert zs.coverage == 0.0 and zs.delta_top1 == 0.0

    lam0 = res.methods["vs2_lam0"]
    assert np.array_equal(lam0.predictions, plain.predictions) and lam0.top1 == plain.top1

    # the same methods as hooks over a full pass (independent path)
    hooked = {
        "vs2": VS2Steering(sae, lam=2.1, gamma=1.5),
        "rec_final": SAEReconstruction(sae),
        "rec_final_gamma": SAEReconstruction(sae, gamma=1.5),
    }
    changed = 0
    for name, steer in hooked.items():
        ref = clf.evaluate(model, data, fwd_hooks=steer.fwd_hooks(model), batch_size=BATCH, num_workers=0,
                           show_progress=False)
        row = res.methods[name]
        assert np.array_equal(row.predictions, ref.predictions), name
        assert row.top1 == pytest.approx(ref.top1) and row.top5 == pytest.approx(ref.top5)
        assert row.delta_top1 == pytest.approx(ref.top1 - plain.top1)
        assert row.coverage == 1.0
        changed += int((ref.predictions != plain.predictions).sum())
    assert changed > 0  # the methods did change some predictions

    # files
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved) >= {"config", "methods", "classnames", "timing"}
    assert list(saved["methods"]) == ["zeroshot", "vs2", "vs2_lam0", "rec_final", "rec_final_gamma"]
    for m in saved["methods"].values():
        assert set(m) >= {"top1", "top5", "mean_per_class", "delta_top1", "coverage", "per_class_acc"}
        assert len(m["per_class_acc"]) == 200
    assert saved["methods"]["vs2"]["top1"] == pytest.approx(res.methods["vs2"].top1)
    assert saved["config"]["hook_name"] == "blocks.1.hook_resid_post" and saved["config"]["n_images"] == N_IMAGES
    assert saved["config"]["lam"] == 2.1 and saved["config"]["gamma"] == 1.5
    assert len(saved["classnames"]) == 200
    for name in ("vs2", "rec_final", "rec_final_gamma"):
        with Image.open(tmp_path / f"per_class_{name}.png") as img:
            assert img.size[0] > 100 and img.size[1] > 100
    table = (tmp_path / "results.md").read_text()
    assert "| vs2 |" in table and f"{res.methods['vs2'].top1:.2f}" in table


@torch.no_grad()
def test_gate_coverage_and_rec_all_pass(setup):
    model, data, clf, plain = setup
    sae = make_topk_sae(seed=1)
    images = torch.stack([data[i][0] for i in range(len(data))])
    cls = torch.cat([model(images[s:s + BATCH], stop_at_layer=2)[:, 0] for s in range(0, len(images), BATCH)])
    fvu = per_sample_fvu(cls, sae)
    tau = float(fvu.quantile(0.3))
    layer_saes = [make_topk_sae(hook=f"blocks.{i}.hook_resid_post", seed=30 + i) for i in range(2)]
    with ImageCounter(model) as counter:
        res = run_eval(model, data, clf, sae, ["vs2", "rec_all"], fvu_threshold=tau,
                       options={"layer_saes": layer_saes})
    assert counter.n == 2 * N_IMAGES  # rec_all needs its own pass over every layer
    assert res.methods["vs2"].coverage == pytest.approx((fvu <= tau).float().mean().item(), abs=1.5 / N_IMAGES)
    assert 0 < res.methods["vs2"].coverage < 1
    ref = clf.evaluate(model, data, fwd_hooks=VS2Steering(sae, fvu_threshold=tau).fwd_hooks(), batch_size=BATCH,
                       num_workers=0, show_progress=False)
    assert np.array_equal(res.methods["vs2"].predictions, ref.predictions)
    ref_all = clf.evaluate(model, data, fwd_hooks=SAEReconstruction(layer_saes).fwd_hooks(), batch_size=BATCH,
                           num_workers=0, show_progress=False)
    assert res.methods["rec_all"].top1 == pytest.approx(ref_all.top1) and res.methods["rec_all"].coverage == 1.0


def test_earlier_hook_runs_the_rest_of_the_tower(setup):
    model, data, clf, _ = setup
    sae = make_topk_sae(hook="blocks.0.hook_resid_post", seed=2)
    res = run_eval(model, data, clf, sae, ["vs2"], lam=3.0, gamma=2.0)
    ref = clf.evaluate(model, data, fwd_hooks=VS2Steering(sae, lam=3.0, gamma=2.0).fwd_hooks(), batch_size=BATCH,
                       num_workers=0, show_progress=False)
    assert np.array_equal(res.methods["vs2"].predictions, ref.predictions)


def test_registered_method_plugs_in(setup):
    model, data, clf, plain = setup
    seen = {}

    @register_method("test_embeds_flip", needs_sae=False)
    def flip(tokens_ND, ctx, *, lam=1.0, **_):
        seen["labels"] = ctx.oracle_labels_N
        return MethodOutput(embeds=-ctx.zeroshot_embeds_NE * lam, coverage=0.5, info={"flipped": True})

    @register_method("test_oracle", needs_sae=False, uses_eval_labels=True)
    def oracle(tokens_ND, ctx, **_):
        seen["oracle"] = ctx.oracle_labels_N.clone()
        return MethodOutput(tokens=tokens_ND, coverage=0.0)

    try:
        res = run_eval(model, data, clf, None, ["test_embeds_flip", "test_oracle"])
        flipped = clf.logits(-model.encode_image(torch.stack([data[i][0] for i in range(len(data))])))
        assert np.array_equal(res.methods["test_embeds_flip"].predictions, flipped.argmax(-1).numpy())
        assert res.methods["test_embeds_flip"].coverage == 0.5
        assert res.methods["test_embeds_flip"].settings == {"lam": 2.1}
        assert seen["labels"] is None  # label-free methods never see the evaluation labels
        assert torch.equal(seen["oracle"], torch.as_tensor(data.subset_labels))
    finally:
        METHODS.pop("test_embeds_flip", None)
        METHODS.pop("test_oracle", None)


def test_bad_methods_fail_before_the_backbone(setup):
    model, data, clf, _ = setup
    with ImageCounter(model) as counter:
        with pytest.raises(KeyError, match="unknown method"):
            run_eval(model, data, clf, make_topk_sae(), ["zeroshot", "vs3"])
        with pytest.raises(ValueError, match="needs an SAE"):
            run_eval(model, data, clf, None, ["vs2"])
        with pytest.raises(ValueError, match="d_in=32"):
            run_eval(model, data, clf, make_topk_sae(d_in=32), ["vs2"])
    assert counter.n == 0
    with pytest.raises(ValueError, match="rec_all"):
        run_eval(model, data, clf, make_topk_sae(), ["rec_all"])


def test_sweep_grid_matches_single_scores(setup, tmp_path):
    model, data, clf, plain = setup
    sae = make_topk_sae(seed=1)
    ev = Evaluator(model, data, sae, clf, batch_size=BATCH, num_workers=0, show_progress=False)
    lams, gammas = [0.0, 2.0, 4.0], [1.5, 3.0]
    sae_calls = []
    sae.add_hook("hook_sae_input", lambda act, hook: sae_calls.append(act.shape[0]))
    try:
        sweep = sweep_vs2(ev, lams, gammas, show_progress=False)
    finally:
        sae.reset_hooks()
    assert sweep.top1_GL.shape == (2, 3) and ev.n_backbone_passes == 1
    assert sum(sae_calls) == N_IMAGES  # one SAE pass over the cached tokens serves all six cells
    assert sweep.zeroshot_top1 == plain.top1
    for gi, g in enumerate(gammas):
        for li, lam in enumerate(lams):
            single = ev.score(MethodSpec("vs2", "vs2", {"lam": lam, "gamma": g}))
            assert sweep.top1_GL[gi, li] == single.top1
    np.testing.assert_allclose(sweep.top1_GL[:, 0], plain.top1)  # lam = 0 is zero-shot
    lam, gamma, top1 = sweep.best
    assert top1 == sweep.top1_GL.max() and sweep.top1_GL[gammas.index(gamma), lams.index(lam)] == top1
    png = plot_sweep_heatmap(sweep, tmp_path / "heat.png")
    with Image.open(png) as img:
        assert img.size[0] > 100
    assert not math.isnan(json.loads(json.dumps(sweep.to_json()))["best"]["delta_top1"])


# ---------------------------------------------------------------------------------- CLI
def _tiny_args(tiny_imagenet_dir, limit: int = 100) -> list[str]:
    return ["--random-weights", "--seed", "5", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu",
            "--dataset", "tiny-imagenet", "--data-dir", str(tiny_imagenet_dir), "--limit", str(limit),
            "--num-workers", "0", "--batch-size", str(BATCH), "--templates", "single"]


def test_cli_eval_and_sweep(tmp_path, tiny_imagenet_dir, capsys, setup):
    from sae_lens_vision_steer.cli import main

    model, _, clf, _ = setup
    sae = make_topk_sae(seed=1)
    sae.cfg.metadata.model_name = "ViT-B-32"
    sae.save_model(tmp_path / "sae")
    rc = main(["eval", *_tiny_args(tiny_imagenet_dir), "--sae", str(tmp_path / "sae"),
               "--methods", "zeroshot,vs2,rec_final,rec_final_gamma", "--out", str(tmp_path / "eval")])
    assert rc == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(saved["methods"]) == ["zeroshot", "vs2", "rec_final", "rec_final_gamma"]
    assert f"{saved['methods']['vs2']['top1']:.2f}" in printed and "Δtop-1" in printed
    # the CLI's zero-shot row is plain CLIP on the same 100 images (same seed -> same random model)
    data100 = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, model.preprocess, limit=100)
    assert saved["methods"]["zeroshot"]["top1"] == pytest.approx(
        clf.evaluate(model, data100, batch_size=BATCH, num_workers=0, show_progress=False).top1)

    rc = main(["sweep", *_tiny_args(tiny_imagenet_dir), "--sae", str(tmp_path / "sae"), "--lams", "0,2",
               "--gammas", "1.5,2", "--out", str(tmp_path / "sweep")])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "selected on the evaluation split itself" in err and "best cell" in out
    sw = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert np.array(sw["sweep"]["top1"]).shape == (2, 2) and "warning" in sw
    assert (tmp_path / "sweep" / "sweep_heatmap.png").is_file()

    rc = main(["sweep", *_tiny_args(tiny_imagenet_dir), "--sae", str(tmp_path / "sae"), "--lams", "0,2",
               "--gammas", "1.5", "--select-on", "train-holdout", "--holdout-fraction", "0.005",
               "--out", str(tmp_path / "holdout")])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "selected on the evaluation split" not in err and "held-out images of tiny-imagenet/train" in out
    assert "(0.005 of 20,000)" in out  # the split's size, not the held-out part's (issue 22 item 8)
    sw = json.loads((tmp_path / "holdout" / "sweep.json").read_text())
    assert sw["sweep"]["n_images"] == 100 and sw["config"]["selection_data"] == "tiny-imagenet/train"
    assert set(sw["evaluation"]) == {"zeroshot", "vs2", "vs2_paper"}
    assert (tmp_path / "holdout" / "results.json").is_file()


def test_cli_run_main_job_and_reuse(tmp_path, tiny_imagenet_dir, capsys):
    from sae_lens_vision_steer.cli import main

    args = ["run", "--random-weights", "--seed", "5", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu",
            "--dataset", "tiny-imagenet", "--data-dir", str(tiny_imagenet_dir), "--train-limit", "300",
            "--eval-limit", "100", "--epochs", "2", "--k", "8", "--templates", "single", "--num-workers", "0",
            "--fvu-quantile", "0.9", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "results.json").read_text())
    assert list(saved["methods"]) == ["zeroshot", "vs2", "rec_final", "rec_final_gamma"]
    assert saved["config"]["fvu_quantile"] == 0.9 and saved["config"]["n_images"] == 100
    info = json.loads((run_dir / "run.json").read_text())
    assert info["cache_rows"] == 300 and info["fvu_threshold"] == saved["config"]["fvu_threshold"]
    # tau is the 0.9 quantile of FVU over the training cache, so about 90% of training images pass the gate
    assert 0.0 < saved["methods"]["vs2"]["coverage"] <= 1.0
    for name in ("cache_train/metadata.json", "sae/cfg.json", "results.md", "per_class_vs2.png"):
        assert (run_dir / name).is_file(), name
    weights = run_dir / "sae" / "sae_weights.safetensors"
    mtime = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # everything is reused: same SAE file, same numbers
    assert weights.stat().st_mtime_ns == mtime
    again = json.loads((run_dir / "results.json").read_text())
    assert again["methods"]["vs2"]["top1"] == saved["methods"]["vs2"]["top1"]
    assert "reused from" in capsys.readouterr().out  # a rerun says what it reused
    assert main(args[:-2] + ["--k", "4", "--out", str(run_dir)]) == EXIT_CONFLICT  # a different request
    assert "k: folder has 8, request has 4" in capsys.readouterr().err
    # issue 22 item 6: another steering setting on a finished run only evaluates again
    cache_meta = run_dir / "cache_train" / "metadata.json"
    cache_mtime = cache_meta.stat().st_mtime_ns
    assert main(args[:-2] + ["--lam", "1.0", "--out", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "re-evaluating: lam: folder has 2.1, request has 1.0" in printed
    assert "reused from" in printed and "cache, sae (only evaluation settings changed" in printed
    assert weights.stat().st_mtime_ns == mtime and cache_meta.stat().st_mtime_ns == cache_mtime
    relam = json.loads((run_dir / "results.json").read_text())
    assert relam["config"]["lam"] == 1.0
    assert relam["methods"]["zeroshot"]["top1"] == saved["methods"]["zeroshot"]["top1"]
    assert json.loads((run_dir / "run.json").read_text())["changed"] == ["lam: folder has 2.1, request has 1.0"]
