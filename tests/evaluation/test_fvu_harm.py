"""The FVU-decile harm/help analysis: Spearman's rho against scipy's, deciles and the suggested gate on a
constructed case, and the runner's per-image FVU against the formula on tokens from run_with_cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from saes import make_topk_sae
from scipy.stats import spearmanr

from sae_lens_vision_steer.data.base import ImageFolderDataset
from sae_lens_vision_steer.evaluation import evaluate
from sae_lens_vision_steer.evaluation.fvu_harm import fvu_harm, spearman
from sae_lens_vision_steer.sae.metadata import activation_mean


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.integers(-1, 2, size=200).astype(float)  # b has many ties
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(a, np.zeros(200)) is None


def test_deciles_and_the_suggested_gate_on_a_constructed_case():
    fvu = np.arange(100) / 100.0  # ten images per decile
    labels = np.zeros(100, dtype=int)
    base = np.zeros(100, dtype=int)  # zero-shot right everywhere ...
    base[:10] = 1  # ... except the ten lowest-FVU images
    steered = base.copy()
    steered[:5] = 0  # steering fixes five of them (help) ...
    steered[-8:] = 1  # ... and breaks the eight highest-FVU images (harm)
    a = fvu_harm(fvu, base, steered, labels, used_tau=0.95, reference_fvu=np.linspace(0, 2, 201))
    assert (a["n_help"], a["n_harm"]) == (5, 8)
    assert [d["n"] for d in a["deciles"]] == [10] * 10
    assert a["deciles"][0]["help_rate"] == 50.0 and a["deciles"][-1]["harm_rate"] == 80.0
    assert a["deciles"][0]["fvu_low"] == 0.0 and a["deciles"][0]["fvu_high"] == 0.09
    # gating at the 9th decile's top (0.89) keeps the help and drops all harm: +5 images
    s = a["suggested_gate"]
    assert s["tau"] == pytest.approx(0.89) and s["net_images"] == 5 and s["eval_quantile"] == 0.9
    assert s["reference_quantile"] == pytest.approx(np.mean(np.linspace(0, 2, 201) <= 0.89))
    assert a["gate_used"]["reference_quantile"] == pytest.approx(np.mean(np.linspace(0, 2, 201) <= 0.95))
    harm = (base == labels) & (steered != labels)
    assert a["spearman_fvu_harm"] == pytest.approx(spearmanr(fvu, harm).statistic)


@torch.no_grad()
def test_runner_records_the_analysis(tiny_clip, tmp_path):
    root = write_image_folder(tmp_path / "images", n_classes=3, per_class=8, size=40)
    data = ImageFolderDataset(root, "all", tiny_clip.preprocess)
    sae = make_topk_sae(tiny_clip.steer_hook)
    res = evaluate(tiny_clip, data, sae, ["vs2", "vs2_ens"], lam=4.0, gamma=2.0, num_workers=0, show_progress=False,
                   out_dir=tmp_path / "out")
    a = res.methods["vs2"].info["fvu_harm"]
    assert "fvu_harm" in res.methods["vs2_ens"].info and "fvu_harm" not in res.methods["zeroshot"].info
    labels, zs, vs2 = res.labels, res.methods["zeroshot"].predictions, res.methods["vs2"].predictions
    assert a["n_harm"] == int(((zs == labels) & (vs2 != labels)).sum())
    assert a["n_help"] == int(((zs != labels) & (vs2 == labels)).sum())
    # the per-image FVU the deciles are cut from: by formula on the final CLS from run_with_cache
    imgs = torch.stack([data[i][0] for i in range(len(data))])
    x = tiny_clip.run_with_cache(imgs, names_filter=tiny_clip.steer_hook)[1][tiny_clip.steer_hook][:, 0]
    rec = sae.decode(sae.encode(x))
    fvu = (((x - rec) ** 2).sum(1) / ((x - activation_mean(sae)) ** 2).sum(1)).numpy()
    assert a["deciles"][0]["fvu_low"] == pytest.approx(float(fvu.min()), rel=1e-4)
    assert a["deciles"][-1]["fvu_high"] == pytest.approx(float(fvu.max()), rel=1e-4)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Does FVU predict harm? `vs2`" in md and "| FVU decile |" in md and "Suggested gate" in md
    assert (tmp_path / "out" / "fvu_deciles_vs2.png").stat().st_size > 1000
