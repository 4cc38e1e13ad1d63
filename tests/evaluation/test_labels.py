"""The reviewers' baselines: kNN votes over VS2++'s neighbours (checked against neighbours searched here
on a pool built independently) and the linear probe (optimality of its fit, its cache, its refusals)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import write_image_folder
from saes import make_topk_sae

from sae_lens_vision_steer.baselines.linear_probe import ProbeConfig, cached_linear_probe, fit_linear_probe
from sae_lens_vision_steer.core.errors import InputError, UsageError
from sae_lens_vision_steer.evaluation import evaluate
from sae_lens_vision_steer.evaluation.methods.labels import vote_logits
from sae_lens_vision_steer.steering.vs2pp import build_retrieval_pool, majority_labels
from sae_lens_vision_steer.zeroshot.classifier import ZeroShotClassifier


def test_vote_logits_rank_by_votes_and_break_ties_to_the_nearest():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (200, 7))
    logits = vote_logits(labels, 5)
    assert (logits.argmax(1) == majority_labels(labels)).all()
    for q in range(20):  # the votes by counting, written out
        counts = Counter(labels[q].tolist())
        assert [int(v) for v in logits[q].floor()] == [counts.get(c, 0) for c in range(5)]
    tie = torch.tensor([[3, 1, 1, 3, 0]])  # 1 and 3 twice each: 3 came first (the most similar neighbour)
    assert vote_logits(tie, 4).argmax(1).item() == 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip):
    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data import load_image_dataset

    root = tmp_path_factory.mktemp("labels")
    final = tiny_clip.steer_hook
    pool_data = load_image_dataset("imagefolder", data_dir=write_image_folder(root / "train", 4, 12, seed=1),
                                   transform=tiny_clip.preprocess)
    test_data = load_image_dataset("imagefolder", data_dir=write_image_folder(root / "test", 4, 5, seed=2),
                                   transform=tiny_clip.preprocess)
    cache_activations(tiny_clip, pool_data, [final], root / "pool", dtype="float32", num_workers=0, show_progress=False)
    return tiny_clip, pool_data, test_data, root


@torch.no_grad()
def test_knn_votes_are_the_neighbours_majority(setup):
    model, pool_data, test_data, root = setup
    clf = ZeroShotClassifier(model, test_data.classnames, show_progress=False)
    sae = make_topk_sae(model.steer_hook)
    res = evaluate(model, test_data, sae, ["vs2pp", "knn_vote", "knn_vote_oracle", "linear_probe"], classifier=clf,
                   num_workers=0, show_progress=False, options={"pool_cache": str(root / "pool"), "n_neighbours": 10})
    assert res.timing["n_backbone_passes"] == 1
    # independent path: the pool's CLS tokens from run_with_cache, neighbours from a fresh index
    final = model.steer_hook
    imgs = torch.stack([pool_data[i][0] for i in range(len(pool_data))])
    pool_cls = model.run_with_cache(imgs, names_filter=final)[1][final][:, 0]
    pool = build_retrieval_pool(clf, model.head(pool_cls), labels_P=torch.as_tensor(pool_data.subset_labels))
    q = model.head(model.run_with_cache(torch.stack([test_data[i][0] for i in range(len(test_data))]),
                                        names_filter=final)[1][final][:, 0])
    idx = pool.index.search(q, 10).indices_QN
    assert (res.methods["knn_vote"].predictions == majority_labels(pool.pseudo_labels_P[idx]).numpy()).all()
    assert (res.methods["knn_vote_oracle"].predictions == majority_labels(pool.labels_P[idx]).numpy()).all()
    assert res.methods["knn_vote"].info["n_neighbours"] == 10 == res.methods["vs2pp"].info["n_neighbours"]
    # the rows that read labels say so, in the row and in the table
    assert res.methods["knn_vote_oracle"].info["uses_labels"] == "training labels"
    assert res.methods["linear_probe"].templates == "none" and res.methods["linear_probe"].prompts == "none"
    table = res.table()
    assert "linear_probe (uses training labels)" in table and "knn_vote_oracle (uses training labels)" in table
    assert "knn_vote (uses" not in table


def test_linear_probe_is_a_minimum_and_is_cached(tmp_path):
    torch.manual_seed(0)
    centres = 3 * torch.randn(3, 16)
    y = torch.arange(3).repeat_interleave(40)
    x = centres[y] + torch.randn(120, 16)
    cfg = ProbeConfig(weight_decays=(1e-4, 1e-2), max_iter=200)
    probe = fit_linear_probe(x, y, 3, cfg)
    assert probe.info["train_top1"] > 95 and set(probe.info["heldout_top1_by_weight_decay"]) == {"0.0001", "0.01"}
    # optimality: the gradient of the regularised loss vanishes at the fitted weights (autograd, here)
    W, b = probe.weight_EC.clone().requires_grad_(True), probe.bias_C.clone().requires_grad_(True)
    feats = (F.normalize(x, dim=-1) - probe.mean_E) / probe.std_E
    loss = F.cross_entropy(feats @ W + b, y) + probe.info["weight_decay"] * (W * W).sum()
    gW, gb = torch.autograd.grad(loss, [W, b])
    assert gW.abs().max() < 1e-3 and gb.abs().max() < 1e-3
    # the cache: a hit returns the same tensors; a damaged file is refused and refitted
    fitted_on = {"model_fingerprint": "m", "n_rows": 120}
    first, s1 = cached_linear_probe(x, y, 3, tmp_path, fitted_on, cfg)
    again, s2 = cached_linear_probe(x, y, 3, tmp_path, fitted_on, cfg)
    assert (s1, s2) == ("built", "hit") and torch.equal(first.weight_EC, again.weight_EC)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:-8])
    assert cached_linear_probe(x, y, 3, tmp_path, fitted_on, cfg)[1] == "rebuilt"
    assert cached_linear_probe(x, y, 3, tmp_path, fitted_on, cfg)[1] == "hit"
    assert cached_linear_probe(x, y.flip(0), 3, tmp_path, fitted_on, cfg)[1] == "built"  # other labels, other key
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    with pytest.raises(InputError, match="every training row's label"):
        fit_linear_probe(x, torch.full((120,), -1), 3, cfg)


def test_probe_and_votes_refuse_without_a_pool(setup):
    model, _, test_data, _ = setup
    clf = ZeroShotClassifier(model, test_data.classnames, show_progress=False)
    with pytest.raises(UsageError, match=r"linear_probe trains on the training split.*--pool-cache"):
        evaluate(model, test_data, None, ["linear_probe"], classifier=clf, num_workers=0, show_progress=False)
    with pytest.raises(UsageError, match="--pool-cache"):
        evaluate(model, test_data, None, ["knn_vote"], classifier=clf, num_workers=0, show_progress=False)
