"""VS2++: the steering vector formula, the S+/S- rules, fallbacks, hooks and the retrieval baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sae_lens import TopKSAE, TopKSAEConfig

from sae_lens_vision_steer.cli.common import EXIT_CONFLICT, EXIT_INPUT, EXIT_USAGE  # noqa: F401
from sae_lens_vision_steer.steering.vs2 import vs2_steer
from sae_lens_vision_steer.steering.vs2pp import (
    VS2PP,
    VS2PPConfig,
    VS2PPSteering,
    build_retrieval_pool,
    clip_head_fn,
    clip_steer_embeds,
    majority_labels,
    positive_mask,
    rule_label,
    split_neighbours,
    steer_with_vectors,
    vs2pp_steering_vector,
    weighted_rag_embeds,
)
from sae_lens_vision_steer.zeroshot.classifier import ZeroShotClassifier


def make_sae(d_in: int = 8, d_sae: int = 32, k: int = 4, seed: int = 0, hook: str | None = None) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    if hook:
        sae.cfg.metadata.hook_name = hook
    return sae.eval()


def topk_codes_by_hand(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """c = ReLU of the k largest entries of (x - b_dec) W_enc + b_enc, zeros elsewhere."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.clamp_min(0))


class ArgmaxClassifier:
    """A stand-in for ZeroShotClassifier: pseudo-label = argmax of embed @ W."""

    def __init__(self, weights_EC: torch.Tensor):
        self.weights_EC = weights_EC

    def predict(self, embeds_QE: torch.Tensor) -> torch.Tensor:
        return (embeds_QE.float() @ self.weights_EC).argmax(-1)


# ------------------------------------------------------------------------------------------ formula
@torch.no_grad()
def test_steering_vector_matches_written_out_formula() -> None:
    sae = make_sae()
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(7, 8, generator=g), torch.randn(5, 8, generator=g)
    gamma = 1.7
    expected = (gamma - 1) * (topk_codes_by_hand(sae, pos).mean(0) - topk_codes_by_hand(sae, neg).mean(0)) @ sae.W_dec
    torch.testing.assert_close(vs2pp_steering_vector(sae, pos, neg, gamma), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one positive"):
        vs2pp_steering_vector(sae, pos[:0], neg, gamma)


def test_steer_with_vectors_preserves_norm_and_direction() -> None:
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = steer_with_vectors(x, v, lam=2.0)
    raw = x + 2.0 * v
    torch.testing.assert_close(out, raw / raw.norm(dim=1, keepdim=True) * x.norm(dim=1, keepdim=True))
    torch.testing.assert_close(steer_with_vectors(x, v, 2.0, preserve_norm=False), raw)


# ------------------------------------------------------------------------------------------ rules
def test_rules_on_a_constructed_neighbour_set() -> None:
    pseudo = torch.tensor([[3, 1, 3, 2, 1, 1],   # majority 1 (three times); query label 3
                           [2, 5, 5, 2, 0, 7]])  # 2 and 5 tie at two each: 2 comes first -> 2
    true = torch.tensor([[4, 4, 0, 4, 1, 0],
                         [6, 6, 6, 1, 6, 6]])
    q_pseudo, q_true = torch.tensor([3, 7]), torch.tensor([4, 1])
    assert majority_labels(pseudo).tolist() == [1, 2]
    assert positive_mask("query", pseudo, q_pseudo).tolist() == [
        [True, False, True, False, False, False], [False, False, False, False, False, True]]
    assert positive_mask("majority", pseudo).tolist() == [
        [False, True, False, False, True, True], [True, False, False, True, False, False]]
    assert positive_mask("oracle", pseudo, q_pseudo, true, q_true).tolist() == [
        [True, True, False, True, False, False], [False, False, False, True, False, False]]
    with pytest.raises(ValueError, match="true labels"):
        positive_mask("oracle", pseudo, q_pseudo)
    with pytest.raises(ValueError, match="-1"):
        positive_mask("oracle", pseudo, q_pseudo, true, torch.tensor([4, -1]))
    with pytest.raises(ValueError, match="unknown S\\+ rule"):
        positive_mask("nearest", pseudo, q_pseudo)
    assert "oracle upper bound" in rule_label("oracle") and rule_label("query") == "query"


# ------------------------------------------------------------------------------------------ pool fixture
def _toy_pool(sae: TopKSAE, n_classes: int = 4, per_class: int = 12, seed: int = 0):
    """Clustered pool: embeddings near class directions; activations correlated with the class."""
    g = torch.Generator().manual_seed(seed)
    e_dim = 6
    centres = F.normalize(torch.randn(n_classes, e_dim, generator=g), dim=-1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    embeds = centres[labels] + 0.25 * torch.randn(len(labels), e_dim, generator=g)
    d = sae.cfg.d_in
    acts = torch.randn(n_classes, d, generator=g)[labels] + 0.3 * torch.randn(len(labels), d, generator=g)
    clf = ArgmaxClassifier(centres.T)
    pool = build_retrieval_pool(clf, embeds, sae=sae, acts_PD=acts, labels_P=labels, pool_chunk_size=7)
    return pool, clf, embeds, acts, labels, centres


@torch.no_grad()
def test_vs2pp_steer_equals_the_formula_on_its_retrieved_split() -> None:
    sae = make_sae()
    pool, clf, embeds, acts, labels, centres = _toy_pool(sae)
    g = torch.Generator().manual_seed(5)
    q_embeds = centres[[0, 1, 2, 3, 1]] + 0.4 * torch.randn(5, 6, generator=g)
    x = torch.randn(5, 8, generator=g)
    for rule in ("query", "majority", "oracle"):
        cfg = VS2PPConfig(n_neighbours=15, rule=rule, lam=1.3, gamma=1.6)
        engine = VS2PP(sae, pool, clf, cfg)
        q_labels = torch.tensor([0, 1, 2, 3, 2])
        out = engine.steer(x, q_embeds, query_labels_Q=q_labels)
        # Independent computation: brute-force neighbours, the rule by hand, the pure function.
        sims = F.normalize(q_embeds, dim=-1) @ F.normalize(embeds, dim=-1).T
        for i in range(5):
            nb = sims[i].argsort(descending=True)[:15]
            assert set(nb.tolist()) == set(out.split.neighbours.indices_QN[i].tolist())
            nb = out.split.neighbours.indices_QN[i]
            nb_pseudo = clf.predict(embeds[nb])
            if rule == "query":
                pos = nb_pseudo == clf.predict(q_embeds[i:i + 1])[0]
            elif rule == "majority":
                counts = torch.bincount(nb_pseudo, minlength=4)
                best = [int(l) for l in nb_pseudo if counts[l] == counts.max()][0]
                pos = nb_pseudo == best
            else:
                pos = labels[nb] == q_labels[i]
            assert pos.tolist() == out.split.positive_QN[i].tolist()
            if pos.all() or not pos.any():
                expected = vs2_steer(x[i:i + 1], sae, lam=1.3, gamma=1.6)[0]
            else:
                v = vs2pp_steering_vector(sae, acts[nb[pos]], acts[nb[~pos]], gamma=1.6)
                expected = steer_with_vectors(x[i:i + 1], v[None], lam=1.3)[0]
            torch.testing.assert_close(out.steered[i], expected, rtol=1e-4, atol=1e-5)
        assert engine.stats["n_queries"] == 5 and engine.stats["n_fallback"] < 5  # the formula path ran


@torch.no_grad()
def test_empty_sets_fall_back_and_are_counted() -> None:
    sae = make_sae()
    pool, clf, embeds, acts, labels, centres = _toy_pool(sae)
    x = torch.randn(3, 8)
    # Query 0 sits on class 0 but has pseudo-label 3 (its CLIP embedding points elsewhere than its
    # retrieval embedding): no neighbour shares it -> empty S+. Queries 1, 2: tight on one class with
    # N = 5 -> all neighbours share the label -> empty S-.
    retrieval = torch.stack([centres[0], centres[1], centres[2]])
    clip = torch.stack([centres[3], centres[1], centres[2]])
    engine = VS2PP(sae, pool, clf, VS2PPConfig(n_neighbours=5, rule="query", lam=2.0, gamma=1.5))
    out = engine.steer(x, clip, query_retrieval_QE=retrieval)
    assert out.split.empty_positive_Q.tolist() == [True, False, False]
    assert out.split.empty_negative_Q.tolist() == [False, True, True]
    torch.testing.assert_close(out.steered, vs2_steer(x, sae, lam=2.0, gamma=1.5), rtol=1e-5, atol=1e-6)
    assert engine.stats == {"n_queries": 3, "n_empty_positive": 1, "n_empty_negative": 2, "n_fallback": 3,
                            "fallback_fraction": 1.0}
    none = VS2PP(sae, pool, clf, VS2PPConfig(n_neighbours=5, rule="query", fallback="none"))
    torch.testing.assert_close(none.steer(x, clip, query_retrieval_QE=retrieval).steered, x)
    assert none.stats["n_fallback"] == 3


def test_oracle_needs_pool_labels() -> None:
    sae = make_sae()
    pool, clf, embeds, acts, _, _ = _toy_pool(sae)
    unlabeled = build_retrieval_pool(clf, embeds, sae=sae, acts_PD=acts)
    engine = VS2PP(sae, unlabeled, clf, VS2PPConfig(rule="oracle", n_neighbours=5))
    with pytest.raises(ValueError, match="pool's true labels"):
        engine.steer(torch.randn(2, 8), embeds[:2], query_labels_Q=torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------ baselines
def test_clip_steer_and_weighted_rag_formulas() -> None:
    sae = make_sae()
    pool, clf, embeds, _, _, centres = _toy_pool(sae)
    q = centres[[0, 2]] + 0.2
    nb = pool.index.search(q, 6)
    split = split_neighbours(pool, nb, "query", clf.predict(q))
    got = clip_steer_embeds(q, pool, split)
    r = F.normalize(embeds, dim=-1)
    for i in range(2):
        ids, pos = nb.indices_QN[i], split.positive_QN[i]
        expected = F.normalize(q[i], dim=0)
        if pos.any() and not pos.all():
            expected = expected + r[ids[pos]].mean(0) - r[ids[~pos]].mean(0)
        torch.testing.assert_close(got[i], expected)
    alpha = 0.3
    rag, fb = weighted_rag_embeds(q, pool, nb, alpha=alpha)
    for i in range(2):
        s = nb.scores_QN[i]
        expected = alpha * F.normalize(q[i], dim=0) + (1 - alpha) * (s / s.sum()) @ r[nb.indices_QN[i]]
        torch.testing.assert_close(rag[i], expected)
    assert not fb.any()
    # Oracle variant: only the members count; a query without members keeps q and is flagged.
    member = torch.zeros(2, 6, dtype=torch.bool)
    member[0, [1, 4]] = True
    rag, fb = weighted_rag_embeds(q, pool, nb, alpha=alpha, member_QN=member)
    s = nb.scores_QN[0, [1, 4]]
    expected0 = alpha * F.normalize(q[0], dim=0) + (1 - alpha) * (s / s.sum()) @ r[nb.indices_QN[0, [1, 4]]]
    torch.testing.assert_close(rag[0], expected0)
    torch.testing.assert_close(rag[1], F.normalize(q[1], dim=0))
    assert fb.tolist() == [False, True]


# ------------------------------------------------------------------------------------------ hooks
@torch.no_grad()
def test_hooks_precomputed_and_online_match_the_cached_path(tiny_clip) -> None:
    model = tiny_clip
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    sae = make_sae(d_in=model.cfg.d_model, d_sae=128, k=8, hook=final)
    g = torch.Generator().manual_seed(0)
    pool_images, query_images = torch.rand(40, 3, 32, 32, generator=g), torch.rand(6, 3, 32, 32, generator=g)
    clf = ZeroShotClassifier(model, ["cat", "dog", "car", "tree"], show_progress=False)

    def final_cls(images):
        _, cache = model.run_with_cache(images, names_filter=final)
        return cache[final][:, 0]

    pool_cls = final_cls(pool_images)
    pool = build_retrieval_pool(clf, model.head(pool_cls), sae=sae, acts_PD=pool_cls, labels_P=torch.arange(40) % 4)
    q_cls = final_cls(query_images)
    head = clip_head_fn(model)
    torch.testing.assert_close(head(q_cls), model.encode_image(query_images))
    cfg = VS2PPConfig(n_neighbours=10, rule="oracle", lam=3.0, gamma=1.5)
    q_labels = torch.tensor([0, 1, 2, 3, 0, 1])
    cached = VS2PP(sae, pool, clf, cfg).steer(q_cls, head(q_cls), query_labels_Q=q_labels)
    expected = model.head(cached.steered)
    assert not torch.allclose(expected, model.encode_image(query_images))  # steering changed something

    pre = VS2PPSteering(sae, lam=3.0)
    with pre.using_vectors(cached.vectors), model.hooks(fwd_hooks=pre.fwd_hooks(model)):
        torch.testing.assert_close(model.encode_image(query_images), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="using_vectors"), model.hooks(fwd_hooks=pre.fwd_hooks(model)):
        model.encode_image(query_images)

    engine = VS2PP(sae, pool, clf, cfg)
    online = VS2PPSteering(sae, engine=engine, embed_fn=head)
    with online.using_labels(q_labels), model.hooks(fwd_hooks=online.fwd_hooks(model)):
        torch.testing.assert_close(model.encode_image(query_images), expected, rtol=1e-4, atol=1e-5)
    assert engine.stats["n_queries"] == 6
    with pytest.raises(RuntimeError, match="using_labels"), model.hooks(fwd_hooks=online.fwd_hooks(model)):
        model.encode_image(query_images)


# ------------------------------------------------------------------------------------------ evaluation runner
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, tiny_clip):
    from conftest import write_image_folder

    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data import load_image_dataset

    model = tiny_clip
    root = tmp_path_factory.mktemp("vs2pp_eval")
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    pool_data = load_image_dataset("imagefolder", data_dir=write_image_folder(root / "train", 4, 12, seed=1),
                                   transform=model.preprocess)
    test_data = load_image_dataset("imagefolder", data_dir=write_image_folder(root / "test", 4, 5, seed=2),
                                   transform=model.preprocess)
    cache_activations(model, pool_data, [final], root / "pool", dtype="float32", num_workers=0, show_progress=False)
    sae = make_sae(d_in=model.cfg.d_model, d_sae=128, k=8, hook=final)
    sae.save_model(root / "sae")
    return model, pool_data, test_data, root, sae, final


@torch.no_grad()
def test_eval_methods_match_the_engine_on_cached_tokens(eval_setup) -> None:
    from sae_lens_vision_steer.evaluation import evaluate
    from sae_lens_vision_steer.evaluation.methods.vs2pp import VS2PP_METHODS

    model, pool_data, test_data, root, sae, final = eval_setup
    clf = ZeroShotClassifier(model, test_data.classnames, show_progress=False)
    res = evaluate(model, test_data, sae, list(VS2PP_METHODS), lam=2.0, gamma=1.5, classifier=clf, num_workers=0,
                   show_progress=False, options={"pool_cache": str(root / "pool"), "n_neighbours": 10})
    assert list(res.methods) == ["zeroshot", *VS2PP_METHODS]
    for name in VS2PP_METHODS:
        info = res.methods[name].info
        assert info["oracle_upper_bound"] == name.endswith("oracle")
        assert info["n_neighbours"] == 10 and info["retrieval_s_per_1000_queries"] > 0
    assert "oracle upper bound" in res.methods["vs2pp_oracle"].info["rule"]
    assert "empty_set_fallback" in res.methods["vs2pp"].info
    table = res.table()
    assert "vs2pp_oracle (oracle upper bound)" in table and "vs2pp (oracle" not in table

    # Independent path: the engine on tokens from run_with_cache, neighbours from a fresh pool.
    _, cache = model.run_with_cache(torch.stack([test_data[i][0] for i in range(len(test_data))]), names_filter=final)
    x = cache[final][:, 0]
    labels = torch.as_tensor(test_data.subset_labels)
    pool_cls = torch.cat([model.run_with_cache(torch.stack([pool_data[i][0] for i in range(j, min(j + 16, len(pool_data)))]),
                                               names_filter=final)[1][final][:, 0] for j in range(0, len(pool_data), 16)])
    pool = build_retrieval_pool(clf, model.head(pool_cls), sae=sae, acts_PD=pool_cls,
                                labels_P=torch.as_tensor(pool_data.subset_labels))
    for name, rule in (("vs2pp", "query"), ("vs2pp_majority", "majority"), ("vs2pp_oracle", "oracle")):
        engine = VS2PP(sae, pool, clf, VS2PPConfig(n_neighbours=10, rule=rule, lam=2.0, gamma=1.5))
        steered = engine.steer(x, model.head(x), query_labels_Q=labels).steered
        pred = clf.predict(model.head(steered)).numpy()
        assert (pred == res.methods[name].predictions).all(), name
        assert res.methods[name].info["empty_set_fallback"] == engine.stats
    nb = pool.index.search(model.head(x), 10)
    rag, _ = weighted_rag_embeds(model.head(x), pool, nb, alpha=0.5)
    assert (clf.predict(rag).numpy() == res.methods["weighted_rag"].predictions).all()


def test_eval_errors_without_pool_or_with_another_model(eval_setup, tmp_path) -> None:
    from conftest import make_tiny_clip

    from sae_lens_vision_steer.evaluation import evaluate

    model, _, test_data, root, sae, _ = eval_setup
    clf = ZeroShotClassifier(model, test_data.classnames, show_progress=False)
    with pytest.raises(ValueError, match="--pool-cache"):
        evaluate(model, test_data, sae, ["vs2pp"], classifier=clf, num_workers=0, show_progress=False)
    other = make_tiny_clip(seed=1)
    clf_other = ZeroShotClassifier(other, test_data.classnames, show_progress=False)
    with pytest.raises(ValueError, match="other model weights"):
        evaluate(other, test_data, sae, ["clip_steer"], classifier=clf_other, num_workers=0, show_progress=False,
                 options={"pool_cache": str(root / "pool")})


def test_cli_eval_runs_vs2pp_methods(eval_setup, tmp_path) -> None:
    import json

    from sae_lens_vision_steer.cli import main

    model, _, _, root, _, _ = eval_setup
    # The CLI builds its own tiny model from the same seed and kwargs, so the pool cache matches it.
    from conftest import TINY_CLIP_KWARGS

    args = ["eval", "--model", "ViT-B-32", "--random-weights", "--seed", "0", "--model-kwargs",
            json.dumps(TINY_CLIP_KWARGS), "--dataset", "imagefolder", "--data-dir", str(root / "test"), "--split", "all",
            "--sae", str(root / "sae"), "--methods", "vs2pp,vs2pp_oracle,weighted_rag", "--pool-cache",
            str(root / "pool"), "--n-neighbours", "7", "--num-workers", "0", "--no-plots", "--out", str(tmp_path / "ev"),
            "--device", "cpu"]
    assert main(args) == 0
    out = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert out["methods"]["vs2pp_oracle"]["info"]["oracle_upper_bound"] is True
    assert out["methods"]["vs2pp"]["info"]["n_neighbours"] == 7
    assert "(oracle upper bound)" in (tmp_path / "ev" / "results.md").read_text()
    no_pool = args[:args.index("--pool-cache")] + args[args.index("--pool-cache") + 2:] + ["--out", str(tmp_path / "e2")]
    assert main(no_pool) == EXIT_USAGE  # a clear error, before the backbone pass


def test_online_hook_refuses_a_non_final_hook(tiny_clip) -> None:
    sae = make_sae(d_in=tiny_clip.cfg.d_model, hook="blocks.0.hook_resid_post")
    pool, clf, *_ = _toy_pool(sae)
    engine = VS2PP(sae, pool, clf)
    with pytest.raises(ValueError, match="different SAE"):
        VS2PPSteering(make_sae(d_in=tiny_clip.cfg.d_model, hook="blocks.0.hook_resid_post"), engine=engine,
                      embed_fn=clip_head_fn(tiny_clip))
    steer = VS2PPSteering(sae, engine=engine, embed_fn=clip_head_fn(tiny_clip))
    with pytest.raises(ValueError, match="final block's CLS"):
        steer.fwd_hooks(tiny_clip)
