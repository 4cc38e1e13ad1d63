"""`sae-eval`: every figure checked against an independent computation written out here (plain TL hooks
instead of the splice, FVU, L0, dead fraction, top-1 and KL recovered by hand)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CLIP_KWARGS, write_image_folder
from sae_lens import SAE, Transcoder, TranscoderConfig
from saes import FINAL, make_topk_sae

from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.core.errors import UsageError
from sae_lens_vision_steer.data import load_image_dataset
from sae_lens_vision_steer.evaluation.sae_eval import evaluate_saes, record_in_sae_folder
from sae_lens_vision_steer.hub.model_card import sae_card_section
from sae_lens_vision_steer.zeroshot.classifier import ZeroShotClassifier

LN2, MLP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), n_classes=3, per_class=4)


@pytest.fixture(scope="module")
def data(tiny_clip, image_dir):
    return load_image_dataset("imagefolder", None, image_dir, transform=tiny_clip.preprocess)


@pytest.fixture(scope="module")
def classifier(tiny_clip, data):
    return ZeroShotClassifier(tiny_clip, data.classnames, "single", show_progress=False)


def cls_sae() -> SAE:
    sae = make_topk_sae(FINAL)
    sae.cfg.metadata.positions = "cls"
    return sae


def random_transcoder() -> Transcoder:
    torch.manual_seed(1)
    tc = Transcoder(TranscoderConfig(d_in=64, d_sae=128, d_out=64, apply_b_dec_to_input=False))
    with torch.no_grad():
        tc.W_enc.mul_(0.3)
        tc.W_dec.mul_(0.05)
        tc.b_enc.add_(0.05)
    tc.cfg.metadata.hook_name, tc.cfg.metadata.hook_name_out, tc.cfg.metadata.positions = LN2, MLP_OUT, "cls"
    return tc.requires_grad_(False)


def by_hand(model, data, sae, classifier, baseline):
    """Everything at once on all images, with plain TransformerLens hooks at the CLS token."""
    images = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    hook_in = sae.cfg.metadata.hook_name
    hook_out = sae.cfg.metadata.get("hook_name_out") or hook_in
    with torch.no_grad():
        embeds, cache = model.run_with_cache(images, names_filter=[hook_in, hook_out])
        x, target = cache[hook_in][:, 0], cache[hook_out][:, 0]
        codes = sae.encode(x)
        rec = sae.decode(codes)

        def put(value):
            def hook(act, hook=None):
                out = act.clone()
                out[:, 0] = value
                return out
            return hook

        def logits(e):
            return model.logit_scale * torch.nn.functional.normalize(e, dim=-1) @ classifier.weights_EC

        clean = logits(embeds)
        recon = logits(model.run_with_hooks(images, fwd_hooks=[(hook_out, put(rec))]))
        fill = torch.zeros_like(target) if baseline == "zero" else target.mean(0, keepdim=True).expand_as(target)
        abl = logits(model.run_with_hooks(images, fwd_hooks=[(hook_out, put(fill))]))

    def kl(new):  # KL(p_clean || p_new), averaged over images
        p, lp, lq = clean.double().softmax(-1), clean.double().log_softmax(-1), new.double().log_softmax(-1)
        return float((p * (lp - lq)).sum(-1).mean())

    t = target.double()
    fvu = float(((t - rec.double()) ** 2).sum() / ((t - t.mean(0)) ** 2).sum())
    top1 = {k: 100.0 * float((v.argmax(-1) == y).double().mean()) for k, v in (("c", clean), ("r", recon))}
    return {"fvu": fvu, "l0": float((codes != 0).sum(-1).double().mean()),
            "dead_fraction": float((~(codes != 0).any(0)).double().mean()), "top1_clean": top1["c"],
            "delta_top1": top1["r"] - top1["c"], "kl_reconstruction": kl(recon), "kl_ablation": kl(abl),
            "kl_recovered": (kl(abl) - kl(recon)) / kl(abl)}


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_sae_eval_matches_hand_computation(tiny_clip, data, classifier, baseline):
    sae = cls_sae()
    res = evaluate_saes(tiny_clip, data, sae, baseline=baseline, classifier=classifier, batch_size=5,
                        num_workers=0, show_progress=False)
    row = res.rows[0]
    expected = by_hand(tiny_clip, data, sae, classifier, baseline)
    for key, value in expected.items():
        assert getattr(row, key) == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert row.explained_variance == pytest.approx(1 - expected["fvu"], rel=1e-5)
    assert row.alive_fraction == pytest.approx(1 - expected["dead_fraction"])
    assert row.n_images == len(data) == row.n_tokens and row.baseline == baseline


def test_transcoder_scored_on_its_output_hook(tiny_clip, data, classifier):
    tc = random_transcoder()
    row = evaluate_saes(tiny_clip, data, tc, classifier=classifier, batch_size=5, num_workers=0,
                        show_progress=False).rows[0]
    expected = by_hand(tiny_clip, data, tc, classifier, "zero")
    assert row.hook_name_out == MLP_OUT and row.architecture == "transcoder"
    for key, value in expected.items():
        assert getattr(row, key) == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_bad_baseline_refused(tiny_clip, data, classifier):
    with pytest.raises(UsageError, match="baseline"):
        evaluate_saes(tiny_clip, data, cls_sae(), baseline="random", classifier=classifier, num_workers=0)


def test_record_in_sae_folder_is_read_by_plain_sae_lens(tiny_clip, data, classifier, tmp_path):
    sae = cls_sae()
    sae.save_model(tmp_path / "sae")
    res = evaluate_saes(tiny_clip, data, sae, classifier=classifier, num_workers=0, show_progress=False)
    record_in_sae_folder(tmp_path / "sae", res.rows[0], res.config)
    loaded = SAE.load_from_disk(tmp_path / "sae")
    rec = loaded.cfg.metadata.sae_eval
    (key,) = rec
    assert key == f"imagefolder:{data.dataset_id.split(':', 1)[1].rsplit('/', 1)[-1]}/{data.split}" or key.endswith(
        f"/{data.split}")
    assert rec[key]["fvu"] == pytest.approx(res.rows[0].fvu) and rec[key]["baseline"] == "zero"
    assert "/" not in key.split(":", 1)[-1].rsplit("/", 1)[0]  # no local path
    card = sae_card_section("me/saes", "cls", {"d_in": 64, "d_sae": 256, "k": 8, "architecture": "topk"},
                            loaded.cfg.metadata.to_dict())
    assert "SAE yardstick" in card and f"{res.rows[0].fvu:.4f}" in card and "zero-ablation" in card
    written = res.save(tmp_path / "out")
    assert json.loads(written["json"].read_text())["rows"][0]["l0"] == pytest.approx(res.rows[0].l0)
    assert written["plot"].stat().st_size > 0 and "KL recovered" in written["markdown"].read_text()


def test_cli_sae_eval(tiny_clip, image_dir, tmp_path, capsys):
    sae = cls_sae()
    sae.save_model(tmp_path / "sae")
    rc = main(["sae-eval", "--sae", str(tmp_path / "sae"), "--random-weights", "--model-kwargs",
               json.dumps(TINY_CLIP_KWARGS), "--dataset", "imagefolder", "--data-dir", str(image_dir), "--split",
               "all", "--num-workers", "0", "--baseline", "mean", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "KL recovered" in out and "mean-abl" in out
    saved = json.loads((tmp_path / "out" / "sae_eval.json").read_text())
    assert saved["config"]["baseline"] == "mean" and saved["rows"][0]["n_images"] == 12
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert list(meta["sae_eval"].values())[0]["fvu"] == pytest.approx(saved["rows"][0]["fvu"])


def test_visaebench_metrics_needing_other_data_are_refused_by_name(tiny_clip, data, classifier):
    with pytest.raises(UsageError, match="segmentation masks"):
        evaluate_saes(tiny_clip, data, cls_sae(), classifier=classifier, visaebench=["localization"], num_workers=0)
    with pytest.raises(UsageError, match="'fvu'"):
        evaluate_saes(tiny_clip, data, cls_sae(), classifier=classifier, visaebench=["nope"], num_workers=0)


def test_visaebench_own_metrics_on_our_activations(tiny_clip, data, classifier):
    """ViSAEBench's code itself (optional dependency: skipped when it is not installed)."""
    pytest.importorskip("visaebench")
    sae = cls_sae()
    row = evaluate_saes(tiny_clip, data, sae, classifier=classifier, num_workers=0, show_progress=False,
                        visaebench=["fvu", "sparse_probing"]).rows[0]
    images = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        _, cache = tiny_clip.run_with_cache(images, names_filter=[FINAL])
        x = cache[FINAL][:, 0].double()
        res = x - sae(x.float()).double()
    # ViSAEBench 0.1.0's FVU, as its code computes it: (E||r||^2 - (E sum_d r_d)^2) / (E||x||^2 - (E sum_d x_d)^2)
    # over tokens (the squared *sum over dimensions* of the mean, not ||E x||^2 as in SAELens' formula).
    def v(t):
        return t.pow(2).sum(-1).mean() - t.sum(-1).mean() ** 2

    expected = float(v(res) / v(x))
    assert row.visaebench["fvu"]["value"] == pytest.approx(expected, rel=1e-4)
    assert row.visaebench["fvu"]["metadata"]["l0"] == pytest.approx(row.l0)
    assert 0.0 <= row.visaebench["sparse_probing"]["value"] <= 1.0
