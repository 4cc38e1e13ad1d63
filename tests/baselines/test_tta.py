"""TPT, C-TPT and the prompt baselines: the learnable-context text encoder, one TPT step against a
reference written out here, the reset, ATFD by formula, the pass counter, and the refusals."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import write_image_folder
from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

from sae_lens_vision_steer import HookedCLIP
from sae_lens_vision_steer.baselines.prompt_tuning import PromptContextEncoder, atfd
from sae_lens_vision_steer.baselines.tta import TPTConfig, TPTViews, run_tpt, tpt_adapt
from sae_lens_vision_steer.core.errors import InputError
from sae_lens_vision_steer.data.base import ImageFolderDataset
from sae_lens_vision_steer.evaluation import MethodSpec, evaluate

NAMES = ["cat", "golden retriever", "hot air balloon", "tench"]
HF_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_clip):
    root = write_image_folder(tmp_path_factory.mktemp("tta") / "images", n_classes=3, per_class=3, size=40)
    return ImageFolderDataset(root, "all", tiny_clip.preprocess)


def test_context_at_init_words_reproduces_library_encode_text(tiny_clip):
    enc = PromptContextEncoder(tiny_clip, NAMES)
    assert enc.n_ctx == 4 and enc.prompts[1] == "a photo of a golden retriever."
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)  # the library's tokenizer and encode_text
    torch.manual_seed(0)
    with torch.no_grad():
        ref = tiny_clip.clip.encode_text(tok([f"a photo of a {c}." for c in NAMES]))
        out = enc(enc.init_ctx)
        batched = enc(torch.stack([enc.init_ctx, enc.init_ctx + torch.randn_like(enc.init_ctx)]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[0], ref, atol=1e-5, rtol=1e-5)
    assert (batched[1] - ref).abs().max() > 1e-3  # the context is really read


def test_context_encoder_on_transformers_clip():
    torch.manual_seed(0)
    hf = CLIPModel(CLIPConfig(vision_config=dict(HF_TINY, image_size=32, patch_size=8),
                              text_config=dict(HF_TINY, max_position_embeddings=16), projection_dim=32))
    model = HookedCLIP(hf, model_name="hf-tiny")
    enc = PromptContextEncoder(model, NAMES)
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=model.tokenize(enc.prompts)).pooler_output
        torch.testing.assert_close(enc(enc.init_ctx), ref, atol=1e-5, rtol=1e-5)


def test_text_less_backbone_is_refused(folder):
    dino = HookedCLIP(Dinov2Model(Dinov2Config(**HF_TINY, image_size=28, patch_size=14)), model_name="dino-tiny")
    with pytest.raises(InputError, match=r"hf_dinov2.*image-only"):
        PromptContextEncoder(dino, NAMES)
    with pytest.raises(InputError, match="image-only"):
        run_tpt(dino, folder, NAMES, TPTConfig(n_views=4), num_workers=0, show_progress=False)


def _reference_step(enc, feats_VE, scale, lam, lr=5e-3, wd=0.01, k=6):
    """One TPT (lam=0) or C-TPT step for one image, every formula written out."""
    ctx = enc.init_ctx.detach().clone().requires_grad_(True)
    f = feats_VE / feats_VE.norm(dim=-1, keepdim=True)

    def weights(c):
        t = enc(c)
        return t / t.norm(dim=-1, keepdim=True)

    w = weights(ctx)
    logits = scale * f @ w.T
    p = logits.softmax(-1)
    ent = -(p * p.log()).sum(-1)
    keep = sorted(range(len(ent)), key=lambda i: float(ent[i].detach()))[:k]
    pbar = p[keep].mean(0)
    loss = -(pbar * pbar.log()).sum()
    centroid = w.mean(0)
    dispersion = sum((w[c] - centroid).norm() for c in range(len(w))) / len(w)
    loss = loss - lam * dispersion
    (g,) = torch.autograd.grad(loss, ctx)
    b1, b2, eps = 0.9, 0.999, 1e-8  # AdamW, first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected
    m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
    new = ctx.detach() * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
    with torch.no_grad():
        return scale * f[0] @ weights(new).T, keep, float(dispersion)


@pytest.mark.parametrize("lam", [0.0, 50.0])
def test_one_step_matches_reference_and_resets(tiny_clip, lam):
    enc = PromptContextEncoder(tiny_clip, NAMES)
    init = enc.init_ctx.clone()
    torch.manual_seed(1)
    feats = torch.randn(3, 64, 32)
    cfg = TPTConfig(lam=lam)
    scale = tiny_clip.logit_scale
    out, info = tpt_adapt(enc, feats, scale, cfg)
    for b in range(3):
        ref, keep, _ = _reference_step(enc, feats[b], scale, lam)
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-4)
        assert sorted(info["selected"][b].tolist()) == sorted(keep)
    with torch.no_grad():
        untuned = scale * F.normalize(feats[:, 0], dim=-1) @ enc.class_weights(enc.init_ctx).T
    assert (out - untuned).abs().max() > 1e-4  # the step changed the prediction
    if lam:  # the ATFD term changes the step
        assert (out - tpt_adapt(enc, feats, scale, TPTConfig())[0]).abs().max() > 1e-4
    # Reset: the context starts afresh per image, so order and company do not matter.
    torch.testing.assert_close(enc.init_ctx, init)
    again, _ = tpt_adapt(enc, feats[[2, 0]], scale, cfg)
    torch.testing.assert_close(again, out[[2, 0]], atol=1e-6, rtol=1e-6)
    alone, _ = tpt_adapt(enc, feats[1:2], scale, cfg)
    torch.testing.assert_close(alone[0], out[1], atol=1e-6, rtol=1e-6)


def test_atfd_formula(tiny_clip):
    torch.manual_seed(2)
    t = torch.randn(2, 5, 8)
    for b in range(2):
        u = [t[b, c] / math.sqrt(float((t[b, c] ** 2).sum())) for c in range(5)]
        centroid = sum(u) / 5
        ref = sum(math.sqrt(float(((x - centroid) ** 2).sum())) for x in u) / 5
        assert atfd(t)[b].item() == pytest.approx(ref, rel=1e-5)


def test_views_and_runner_counts_64_forwards_per_image(tiny_clip, folder):
    views = TPTViews(tiny_clip.preprocess, 32, 64, "crop")(folder.load_image(0))
    assert views.shape == (64, 3, 32, 32)
    torch.testing.assert_close(views[0], folder[0][0])  # view 0 is the image as zero-shot sees it
    assert (views[1:] - views[0]).abs().flatten(1).amax(1).min() > 0  # the others are augmented

    res = evaluate(tiny_clip, folder, None, methods=["prompt_ensemble", "zeroshot_single",
                                                     MethodSpec("tpt", "tpt", {"tpt_augment": "crop"})],
                   num_workers=0, show_progress=False)
    n = len(folder)
    assert res.timing["n_image_forwards"] == n + 64 * n  # the shared pass, then TPT's 64 views per image
    tpt = res.methods["tpt"]
    assert tpt.info["image_forwards_per_image"] == 64 and tpt.info["cost"]["image_forwards"] == 64 * n
    assert "img fwd/img" in res.table() and " 64" in res.table()
    assert res.methods["prompt_ensemble"].info["same_as_zeroshot"]  # the folder's default: the single template
    assert res.methods["zeroshot_single"].top1 == res.methods["zeroshot"].top1

    # The runner's row is the per-image computation, image by image, in the data set's order.
    run = run_tpt(tiny_clip, folder, folder.classnames, TPTConfig(augment="crop"), num_workers=0, show_progress=False)
    assert (run.logits_NC.argmax(1).numpy() == tpt.predictions).all()
    enc = PromptContextEncoder(tiny_clip, folder.classnames)
    from sae_lens_vision_steer.baselines.tta import (
        ViewSet,  # the runner's own view set, image 4
    )

    v4 = ViewSet(folder, TPTViews(tiny_clip.preprocess, 32, 64, "crop"), 0)[4][0]
    with torch.no_grad():
        f4 = tiny_clip.encode_image(v4)
    one, _ = tpt_adapt(enc, f4[None], tiny_clip.logit_scale, TPTConfig(augment="crop"))
    torch.testing.assert_close(one[0], run.logits_NC[4], atol=1e-5, rtol=1e-5)


def test_prompt_ensemble_uses_the_data_sets_templates(tiny_clip, folder):
    templates = ["a photo of a {}.", "a drawing of a {}.", "itap of a {}."]
    folder.prompt_templates = templates
    try:
        res = evaluate(tiny_clip, folder, None, methods=["prompt_ensemble"], templates="single",
                       num_workers=0, show_progress=False)
    finally:
        del folder.prompt_templates
    row = res.methods["prompt_ensemble"]
    assert row.info["templates"] == templates and not row.info["same_as_zeroshot"]
    with torch.no_grad():  # CLIP's prompt ensembling by formula
        per = torch.stack([F.normalize(tiny_clip.clip.encode_text(tiny_clip.tokenize([t.format(c) for t in templates])), dim=-1)
                           for c in folder.classnames])
        w = F.normalize(per.mean(1), dim=-1)
        imgs = torch.stack([folder[i][0] for i in range(len(folder))])
        pred = (F.normalize(tiny_clip.clip.encode_image(imgs), dim=-1) @ w.T).argmax(1)
    assert (pred.numpy() == row.predictions).all()


def test_two_ranks_split_the_images_and_match_one_process(tmp_path):
    """Under torchrun (here: 2 forked gloo ranks) each rank tunes its block of images; the gathered
    result is the one-process result, prediction for prediction."""
    import json

    from conftest import TINY_CLIP_KWARGS
    from dist_worker import launch_forked

    from sae_lens_vision_steer.cli import main

    data = write_image_folder(tmp_path / "images", n_classes=3, per_class=2, size=40)

    def argv(out):  # batch 64 / 64 views = 1 image per grid batch: 6 batches, 3 per rank
        return ["eval", "--random-weights", "--seed", "0", "--model", "ViT-B-32", "--model-kwargs",
                json.dumps(TINY_CLIP_KWARGS), "--device", "cpu", "--dataset", "imagefolder", "--data-dir", str(data),
                "--split", "all", "--batch-size", "64", "--num-workers", "0", "--no-progress", "--templates", "single",
                "--methods", "tpt", "--no-plots", "--out", str(out)]

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"out": str(tmp_path), "steps": [{"argv": argv(tmp_path / "two")}]}))
    assert launch_forked(plan, 2, timeout=120) == [0, 0]
    steps = [json.loads((tmp_path / f"rank{r}.json").read_text())[0] for r in (0, 1)]
    assert [st["rc"] for st in steps] == [0, 0]
    assert [st["batches"].count(64) for st in steps] == [3, 3]  # each rank ran the 64 views of its 3 images
    assert main(argv(tmp_path / "one")) == 0
    two, one = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("two", "one"))
    assert two["methods"]["tpt"]["info"]["cost"]["ranks"] == 2 and one["methods"]["tpt"]["info"]["cost"]["ranks"] == 1
    for key in ("top1", "top5", "per_class_acc"):
        assert two["methods"]["tpt"][key] == one["methods"]["tpt"][key]
    for key in ("mean_selected_entropy_before", "mean_atfd_before"):  # every image, with the same views
        assert two["methods"]["tpt"]["info"]["cost"][key] == pytest.approx(one["methods"]["tpt"]["info"]["cost"][key])
    assert two["timing"]["n_image_forwards"] == one["timing"]["n_image_forwards"] == 6 + 64 * 6
