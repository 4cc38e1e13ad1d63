"""The prompt protocol per row: each row's templates are part of its definition, recorded in results.json
and the table; `vs2_ens` shares `vs2`'s backbone pass and is checked against a hooked pass classified
with the ensemble head built by formula."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import write_image_folder
from saes import make_topk_sae

from sae_lens_vision_steer.core.errors import UnknownNameError, UsageError
from sae_lens_vision_steer.data.base import ImageFolderDataset
from sae_lens_vision_steer.evaluation import MethodSpec, evaluate
from sae_lens_vision_steer.steering import VS2Steering
from sae_lens_vision_steer.zeroshot.classifier import ZeroShotClassifier

ENSEMBLE = ["a photo of a {}.", "a drawing of a {}.", "itap of a {}."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_clip):
    root = write_image_folder(tmp_path_factory.mktemp("protocol") / "images", n_classes=3, per_class=4, size=40)
    data = ImageFolderDataset(root, "all", tiny_clip.preprocess)
    data.prompt_templates = ENSEMBLE  # the data set's own ensemble (as the OOD sets carry CLIP-benchmark's)
    return data


def _hooked_predictions(model, data, sae, templates, **vs2):
    """A full pass with VS2 as a TransformerLens hook, classified with a head built here by formula."""
    with torch.no_grad():
        per = torch.stack([F.normalize(model.clip.encode_text(model.tokenize([t.format(c) for t in templates])), dim=-1)
                           for c in data.classnames])
        w = F.normalize(per.mean(1), dim=-1)
        imgs = torch.stack([data[i][0] for i in range(len(data))])
        with model.hooks(fwd_hooks=VS2Steering(sae, **vs2).fwd_hooks(model)):
            emb = model.encode_image(imgs)
    return (F.normalize(emb, dim=-1) @ w.T).argmax(1).numpy()


def test_rows_carry_their_protocol_and_vs2_ens_shares_the_pass(tiny_clip, folder, tmp_path):
    torch.manual_seed(0)
    sae = make_topk_sae(tiny_clip.steer_hook)
    res = evaluate(tiny_clip, folder, sae, ["vs2", "vs2_ens", "zeroshot_single", "prompt_ensemble"], templates="single",
                   lam=3.0, gamma=2.0, num_workers=0, show_progress=False, out_dir=tmp_path)
    n = len(folder)
    assert res.timing["n_backbone_passes"] == 1 and res.timing["n_image_forwards"] == n  # one pass for all rows
    rows = res.methods
    assert rows["vs2"].templates == "single" and rows["zeroshot"].templates == "single"
    assert rows["vs2_ens"].templates == ENSEMBLE and rows["prompt_ensemble"].templates == ENSEMBLE
    assert rows["vs2_ens"].prompts == "custom (3)" and rows["vs2"].prompts == "single"
    # vs2 is the hooked VS2 pass under the single prompt; vs2_ens the same steering under the ensemble
    assert (rows["vs2"].predictions == _hooked_predictions(tiny_clip, folder, sae, ["a photo of a {}."],
                                                           lam=3.0, gamma=2.0)).all()
    assert (rows["vs2_ens"].predictions == _hooked_predictions(tiny_clip, folder, sae, ENSEMBLE, lam=3.0,
                                                               gamma=2.0)).all()
    # the change against zero-shot with the same prompts: VS2 + Ens against the prompt ensemble
    assert rows["vs2_ens"].delta_same_prompts == pytest.approx(rows["vs2_ens"].top1 - rows["prompt_ensemble"].top1)
    assert rows["vs2_ens"].delta_top1 == pytest.approx(rows["vs2_ens"].top1 - rows["zeroshot"].top1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["templates"] == "single"
    assert saved["methods"]["vs2_ens"]["templates"] == ENSEMBLE and saved["methods"]["vs2_ens"]["n_templates"] == 3
    assert saved["methods"]["vs2"]["templates"] == "single"
    table = (tmp_path / "results.md").read_text()
    assert "| prompts |" in table and "Δ same prompts" in table
    assert "| vs2_ens | custom (3) |" in table and "| vs2 | single |" in table


def test_vs2_ens_is_gated_with_vs2_and_a_row_can_name_its_templates(tiny_clip, folder):
    sae = make_topk_sae(tiny_clip.steer_hook)
    clf = ZeroShotClassifier(tiny_clip, folder.classnames, "single", show_progress=False)
    res = evaluate(tiny_clip, folder, sae, ["vs2", "vs2_ens", MethodSpec("vs2_cifar", "vs2", {"templates": "cifar"})],
                   classifier=clf, fvu_threshold=0.0, num_workers=0, show_progress=False)
    assert res.methods["vs2_ens"].settings["fvu_threshold"] == 0.0  # gated because vs2 is
    assert res.methods["vs2_ens"].coverage == res.methods["vs2"].coverage == 0.0  # FVU > 0: nothing steered
    assert res.methods["vs2_cifar"].templates == "cifar" and res.methods["vs2_cifar"].prompts == "cifar (18)"


def test_unknown_templates_are_refused_with_the_list(tiny_clip, folder):
    sae = make_topk_sae(tiny_clip.steer_hook)
    with pytest.raises(UnknownNameError, match=r"unknown template set 'bogus'; choose from \['cifar', 'cub'"):
        evaluate(tiny_clip, folder, sae, ["vs2"], templates="bogus", num_workers=0, show_progress=False)
    with pytest.raises(UnknownNameError, match="unknown template set 'nope'"):
        evaluate(tiny_clip, folder, sae, [MethodSpec("x", "vs2", {"templates": "nope"})], num_workers=0,
                 show_progress=False)
    with pytest.raises(UsageError, match="with '{}'"):
        evaluate(tiny_clip, folder, sae, [MethodSpec("x", "vs2", {"templates": ["no slot"]})], num_workers=0,
                 show_progress=False)
