"""ZERO against a reference written out here from FarinaMatteo/zero's `Zero.zero` (entropy filter, one-hot
votes, greedy tie-break), its forwards counted like TPT's, and VS2 + Ens + Aug against a hooked pass over
the same views."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import write_image_folder
from saes import make_topk_sae

from sae_lens_vision_steer.baselines.views import TPTViews, ViewSet
from sae_lens_vision_steer.baselines.zero import ZeroConfig, zero_vote
from sae_lens_vision_steer.core.errors import UsageError
from sae_lens_vision_steer.data.base import ImageFolderDataset
from sae_lens_vision_steer.evaluation import MethodSpec, evaluate
from sae_lens_vision_steer.steering import VS2Steering


def reference_zero(logits_VC: torch.Tensor, n_kept: int) -> int:
    """Their algorithm for one image, in plain Python: the prediction."""
    V, C = logits_VC.shape
    ent = []
    for v in range(V):
        z = [math.exp(x - max(logits_VC[v].tolist())) for x in logits_VC[v].tolist()]
        p = [x / sum(z) for x in z]
        ent.append(-sum(q * math.log(q) for q in p if q > 0))
    order = sorted(range(V), key=lambda v: (ent[v], v))
    argmax = [max(range(C), key=lambda c, v=v: (logits_VC[v, c].item(), -c)) for v in range(V)]
    counts = [0] * C
    for v in order[:n_kept]:
        counts[argmax[v]] += 1
    ties = [c for c in range(C) if counts[c] == max(counts)]
    if len(ties) == 1:
        return ties[0]
    for v in order[n_kept:]:
        if argmax[v] in ties:
            return argmax[v]
    v = order[n_kept] if n_kept < V else order[0]
    return max(ties, key=lambda c: logits_VC[v, c].item())


def test_zero_vote_matches_the_reference_including_ties():
    torch.manual_seed(0)
    logits = 5 * torch.randn(300, 10, 4)
    for n_kept in (1, 2, 3, 10):
        scores = zero_vote(logits, n_kept)
        assert [reference_zero(logits[b], n_kept) for b in range(300)] == scores.argmax(1).tolist()
        # the votes of the kept views, plus one for the winner
        assert torch.allclose(scores.sum(1), torch.full((300,), n_kept + 1.0))
    # a tie two against two, broken by the first discarded view (in confidence order) voting a tied class
    sharp = torch.tensor([[9.0, 0, 0], [0, 9, 0], [8.0, 0, 0], [0, 8, 0], [0, 0, 1], [0, 1.5, 0]])
    assert zero_vote(sharp[None], 4).argmax(1).item() == 1 == reference_zero(sharp, 4)
    assert ZeroConfig().n_kept == 6 and ZeroConfig(keep=0.3).n_kept == 19  # the paper's 10%, the code's 0.3
    with pytest.raises(UsageError, match="keeps none"):
        ZeroConfig(n_views=4, keep=0.1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_clip):
    root = write_image_folder(tmp_path_factory.mktemp("zero") / "images", n_classes=3, per_class=3, size=40)
    data = ImageFolderDataset(root, "all", tiny_clip.preprocess)
    data.prompt_templates = ["a photo of a {}.", "a drawing of a {}.", "itap of a {}."]
    return data


def _head(model, classnames, templates):
    with torch.no_grad():
        per = torch.stack([F.normalize(model.clip.encode_text(model.tokenize([t.format(c) for t in templates])), dim=-1)
                           for c in classnames])
    return F.normalize(per.mean(1), dim=-1)


@torch.no_grad()
def test_zero_and_vs2_ens_aug_in_the_runner(tiny_clip, folder):
    sae = make_topk_sae(tiny_clip.steer_hook)
    # 16 views here (64 by default) to keep the test fast; ZERO keeps 25% of them
    res = evaluate(tiny_clip, folder, sae, [MethodSpec("zero", "zero", {"zero_views": 16, "zero_keep": 0.25}),
                                            MethodSpec("vs2_ens_aug", "vs2_ens_aug", {"aug_views": 16})],
                   templates="single", lam=3.0, gamma=2.0, num_workers=0, show_progress=False)
    n = len(folder)
    assert res.timing["n_image_forwards"] == n + 2 * 16 * n  # the shared pass, then 16 views per image per row
    row = res.methods["zero"]
    assert row.info["image_forwards_per_image"] == 16 and row.info["cost"]["text_passes_per_image"] == 0
    assert "img fwd/img" in res.table()
    assert row.templates == "single" and res.methods["vs2_ens_aug"].templates == folder.prompt_templates
    views = ViewSet(folder, TPTViews(tiny_clip.preprocess, 32, 16, "crop"), 0)
    w_single = _head(tiny_clip, folder.classnames, ["a photo of a {}."])
    for i in range(n):  # ZERO by the reference, on the views of image i and a head built here
        f = F.normalize(tiny_clip.clip.encode_image(views[i][0]), dim=-1)
        logits = tiny_clip.logit_scale * f @ w_single.T
        assert reference_zero(logits, 4) == row.predictions[i]
    # VS2 + Ens + Aug: VS2 as a hook on every view, TPT's augmentation (AugMix for a non-ImageNet data set)
    w_ens = _head(tiny_clip, folder.classnames, folder.prompt_templates)
    aug = ViewSet(folder, TPTViews(tiny_clip.preprocess, 32, 16, "augmix"), 0)
    steer = VS2Steering(sae, 3.0, 2.0)
    with tiny_clip.hooks(fwd_hooks=steer.fwd_hooks(tiny_clip)):
        for i in range(n):
            f = F.normalize(tiny_clip.encode_image(aug[i][0]), dim=-1)
            p = (tiny_clip.logit_scale * f @ w_ens.T).softmax(-1).mean(0)
            assert p.argmax().item() == res.methods["vs2_ens_aug"].predictions[i]
