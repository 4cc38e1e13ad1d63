"""VS2++ retrieval with a second image backbone (DINOv2-style): embeddings cached next to the pool cache,
neighbours equal to a brute-force cosine kNN over the library's own forward, reuse, and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP_KWARGS, write_image_folder
from PIL import Image

from sae_lens_vision_steer import HookedCLIP
from sae_lens_vision_steer.cli.common import EXIT_CONFLICT, EXIT_USAGE
from sae_lens_vision_steer.retrieval.backbone import (
    CorruptRetrievalCacheError,
    RetrievalCacheError,
    load_retrieval_backbone,
    open_retrieval_cache,
    pool_retrieval_embeddings,
    query_retrieval_embeddings,
    resolve_backbone_name,
)
from sae_lens_vision_steer.retrieval.index import ExactCosineIndex, Neighbours
from sae_lens_vision_steer.zeroshot.classifier import ZeroShotClassifier


def tiny_dinov2(seed: int = 0) -> HookedCLIP:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                    image_size=28, patch_size=14)
    return HookedCLIP(transformers.Dinov2Model(cfg).eval())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_clip):
    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data import load_image_dataset

    root = tmp_path_factory.mktemp("retrieval_backbone")
    final = f"blocks.{tiny_clip.cfg.n_layers - 1}.hook_resid_post"
    pool = load_image_dataset("imagefolder", data_dir=write_image_folder(root / "train", 3, 8, seed=1),
                              transform=tiny_clip.preprocess)
    test = load_image_dataset("imagefolder", data_dir=write_image_folder(root / "test", 3, 3, seed=2),
                              transform=tiny_clip.preprocess)
    cache_activations(tiny_clip, pool, [final], root / "pool", dtype="float32", num_workers=0, show_progress=False)
    return tiny_clip, pool, test, root


@torch.no_grad()
def _library_embeds(dino: HookedCLIP, dataset) -> torch.Tensor:
    """transformers' own forward (pooler_output) on each image, read from disk by hand."""
    rows = [dino.clip(pixel_values=dino.preprocess(Image.open(p).convert("RGB"))[None]).pooler_output[0] for p in dataset.paths]
    return torch.stack(rows)


def _brute_force_knn(q: torch.Tensor, pool: torch.Tensor, n: int) -> torch.Tensor:
    sims = F.normalize(q, dim=-1) @ F.normalize(pool, dim=-1).T  # [Q, P], written out: no index code
    return torch.tensor([sorted(range(pool.shape[0]), key=lambda j: (-float(row[j]), j))[:n] for row in sims])


@torch.no_grad()
def test_neighbours_equal_brute_force_knn_and_drive_the_methods(setup) -> None:
    from sae_lens_vision_steer.evaluation import evaluate
    from sae_lens_vision_steer.steering.vs2pp import (
        build_retrieval_pool,
        weighted_rag_embeds,
    )

    model, pool_data, test_data, root = setup
    dino = tiny_dinov2()
    folder = root / "bf_cache"
    pool_r = pool_retrieval_embeddings(dino, root / "pool", folder, num_workers=0)
    query_r = query_retrieval_embeddings(dino, test_data, folder, num_workers=0)
    lib_pool, lib_query = _library_embeds(dino, pool_data), _library_embeds(dino, test_data)
    assert pool_r.embeds.shape == (len(pool_data), 64) and not pool_r.cached
    torch.testing.assert_close(torch.from_numpy(pool_r.embeds), lib_pool, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(query_r.embeds), lib_query, atol=1e-5, rtol=1e-5)
    expected = _brute_force_knn(lib_query, lib_pool, 5)
    assert torch.equal(ExactCosineIndex(pool_r.embeds).search(query_r.embeds, 5).indices_QN, expected)

    # The evaluation runner retrieves with the backbone: weighted RAG on the brute-force neighbours by hand.
    clf = ZeroShotClassifier(model, test_data.classnames, show_progress=False)
    res = evaluate(model, test_data, None, ["weighted_rag"], classifier=clf, num_workers=0, show_progress=False,
                   options={"pool_cache": str(root / "pool"), "n_neighbours": 5, "retrieval_backbone": dino,
                            "retrieval_cache": str(folder)})
    info = res.methods["weighted_rag"].info
    assert info["retrieval_embedding"] == "custom" == info["retrieval_backbone"]  # the wrapped model's name
    assert info["pool_features_cached"] and info["query_features_cached"]  # made above, reused
    clip_pool = torch.cat([model.encode_image(pool_data[i][0][None]) for i in range(len(pool_data))])
    clip_q = torch.cat([model.encode_image(test_data[i][0][None]) for i in range(len(test_data))])
    pool = build_retrieval_pool(clf, clip_pool)
    sims = F.normalize(lib_query, dim=-1) @ F.normalize(lib_pool, dim=-1).T
    nb = Neighbours(sims.gather(1, expected), expected)
    rag, _ = weighted_rag_embeds(clip_q, pool, nb, alpha=0.5)
    assert (clf.predict(rag).numpy() == res.methods["weighted_rag"].predictions).all()


def test_second_run_reuses_the_cache_and_default_folder_sits_next_to_the_pool(setup, monkeypatch) -> None:
    import sae_lens_vision_steer.retrieval.backbone as rb

    model, _, test_data, root = setup
    dino = tiny_dinov2()
    first = pool_retrieval_embeddings(dino, root / "pool", num_workers=0)
    assert first.cache_dir == (root / "pool.retrieval" / "custom").resolve() and not first.cached
    q1 = query_retrieval_embeddings(dino, test_data, first.cache_dir, num_workers=0)
    monkeypatch.setattr(rb, "embed_images", lambda *a, **k: pytest.fail("recomputed instead of reused"))
    again = pool_retrieval_embeddings(dino, root / "pool", num_workers=0)
    q2 = query_retrieval_embeddings(dino, test_data, first.cache_dir, num_workers=0)
    assert again.cached and q2.cached
    assert np.array_equal(first.embeds, again.embeds) and np.array_equal(q1.embeds, q2.embeds)
    meta = json.loads((first.cache_dir / "metadata.json").read_text())
    assert meta["backbone"]["model_fingerprint"] and set(meta["sets"]) >= {"pool"}
    assert meta["sets"]["pool"]["dataset"] == "imagefolder:train" and meta["sets"]["pool"]["split"] == "all"
    assert not list(first.cache_dir.glob(".*.tmp"))  # atomic writes left no temp file

    # A damaged file is refused by sha256, not used.
    first.file.write_bytes(first.file.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CorruptRetrievalCacheError, match="corrupt"):
        pool_retrieval_embeddings(dino, root / "pool", num_workers=0)


def test_refuses_a_cache_of_another_backbone_or_other_pool_images(setup, tmp_path, tiny_clip) -> None:
    import shutil

    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data import load_image_dataset
    from sae_lens_vision_steer.evaluation import evaluate

    _, _, test_data, root = setup
    pool_dir, folder = tmp_path / "pool", tmp_path / "rcache"
    shutil.copytree(root / "pool", pool_dir)
    pool_retrieval_embeddings(tiny_dinov2(), pool_dir, folder, num_workers=0)
    with pytest.raises(RetrievalCacheError, match="another backbone.*model_fingerprint"):
        open_retrieval_cache(tiny_dinov2(seed=1), pool_dir, folder)  # same architecture, other weights

    # The pool cache is rebuilt on other images: the retrieval cache no longer matches and is refused.
    other = load_image_dataset("imagefolder", data_dir=write_image_folder(tmp_path / "train", 3, 6, seed=5),
                               transform=tiny_clip.preprocess)
    final = f"blocks.{tiny_clip.cfg.n_layers - 1}.hook_resid_post"
    cache_activations(tiny_clip, other, [final], pool_dir, dtype="float32", num_workers=0, show_progress=False,
                      overwrite=True)
    with pytest.raises(RetrievalCacheError, match="other pool images.*(n_images|dataset_fingerprint)"):
        open_retrieval_cache(tiny_dinov2(), pool_dir, folder)
    clf = ZeroShotClassifier(tiny_clip, test_data.classnames, show_progress=False)
    with pytest.raises(RetrievalCacheError, match="other pool images"):  # in prepare: before the backbone pass
        evaluate(tiny_clip, test_data, None, ["clip_steer"], classifier=clf, num_workers=0, show_progress=False,
                 options={"pool_cache": str(pool_dir), "retrieval_backbone": tiny_dinov2(),
                          "retrieval_cache": str(folder)})
    with pytest.raises(ValueError, match="not both"):
        evaluate(tiny_clip, test_data, None, ["clip_steer"], classifier=clf, num_workers=0, show_progress=False,
                 options={"pool_cache": str(pool_dir), "retrieval_backbone": tiny_dinov2(),
                          "pool_retrieval_embeds": "a.npy", "query_retrieval_embeds": "b.npy"})


def test_backbone_names_and_weights() -> None:
    assert resolve_backbone_name("dinov2-base") == "hf:facebook/dinov2-base"
    assert resolve_backbone_name("timm:vit_base_patch14_dinov2") == "timm:vit_base_patch14_dinov2"
    with pytest.raises(ValueError, match="--retrieval-pretrained"):
        load_retrieval_backbone("ViT-B-32")  # an open_clip name needs its weights named
    with pytest.raises(ValueError, match="not both"):
        load_retrieval_backbone("ViT-B-32", pretrained="openai", random_weights=True)


def test_cli_eval_with_a_retrieval_backbone(setup, tmp_path) -> None:
    from sae_lens_vision_steer.cli import main

    _, _, _, root = setup
    rcache = tmp_path / "rc"
    args = ["eval", "--model", "ViT-B-32", "--random-weights", "--seed", "0", "--model-kwargs",
            json.dumps(TINY_CLIP_KWARGS), "--dataset", "imagefolder", "--data-dir", str(root / "test"), "--split", "all",
            "--methods", "clip_steer,weighted_rag", "--pool-cache", str(root / "pool"), "--n-neighbours", "4",
            "--retrieval-backbone", "timm:vit_tiny_patch16_224", "--retrieval-random-weights",
            "--retrieval-model-kwargs", '{"depth": 1}', "--retrieval-cache", str(rcache), "--num-workers", "0",
            "--no-plots", "--no-progress", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "e1")]) == 0
    info = json.loads((tmp_path / "e1" / "results.json").read_text())["methods"]["clip_steer"]["info"]
    assert info["retrieval_backbone"] == info["retrieval_embedding"] == "timm:vit_tiny_patch16_224"
    assert info["pool_features_cached"] is False and info["pool_feature_s"] > 0
    assert main(args + ["--out", str(tmp_path / "e2")]) == 0
    info = json.loads((tmp_path / "e2" / "results.json").read_text())["methods"]["clip_steer"]["info"]
    assert info["pool_features_cached"] is True and info["query_features_cached"] is True
    other = args[:args.index('{"depth": 1}')] + ['{"depth": 2}'] + args[args.index('{"depth": 1}') + 1:]
    assert main(other + ["--out", str(tmp_path / "e3")]) == EXIT_CONFLICT  # another backbone, same folder
    assert main(args + ["--out", str(tmp_path / "e4"), "--pool-retrieval-embeds", "x.npy",
                        "--query-retrieval-embeds", "y.npy"]) == EXIT_USAGE  # "not both", before any file is read
    no_pool = [a for a in args if a not in ("--pool-cache", str(root / "pool"))]
    assert main(no_pool + ["--out", str(tmp_path / "e5")]) == EXIT_USAGE


def test_cli_run_and_sweep_vs2pp_with_a_retrieval_backbone(setup, tmp_path) -> None:
    """The paper's VS2++ as one command (`run`), then a lam x gamma sweep of VS2++ on the same retrieval cache."""
    from sae_lens_vision_steer.cli import main

    _, _, _, root = setup
    data = write_image_folder(tmp_path / "data" / "train", 3, 8, seed=3).parent
    write_image_folder(data / "val", 3, 3, seed=4)
    backbone = ["--retrieval-backbone", "timm:vit_tiny_patch16_224", "--retrieval-random-weights",
                "--retrieval-model-kwargs", '{"depth": 1}']
    common = ["--random-weights", "--seed", "0", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu",
              "--dataset", "imagefolder", "--data-dir", str(data), "--templates", "single", "--num-workers", "0",
              "--no-progress"]
    run = ["run", *common, "--epochs", "1", "--k", "8", "--train-batch-size", "8", "--methods", "zeroshot,vs2,vs2pp", "--n-neighbours", "5",
           *backbone, "--out", str(tmp_path / "run")]
    assert main(run) == 0
    info = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]["vs2pp"]["info"]
    assert info["retrieval_backbone"] == "timm:vit_tiny_patch16_224" and info["n_neighbours"] == 5
    rcache = tmp_path / "run" / "cache_train.retrieval" / "timm_vit_tiny_patch16_224"
    assert (rcache / "pool.npy").is_file() and info["retrieval_cache"] == str(rcache)

    sweep = ["sweep", *common, "--split", "val", "--sae", str(tmp_path / "run" / "sae"), "--sweep-method", "vs2pp",
             "--pool-cache", str(tmp_path / "run" / "cache_train"), "--n-neighbours", "5", *backbone,
             "--lams", "1,2", "--gammas", "1.5", "--out", str(tmp_path / "sweep")]
    assert main(sweep) == 0
    sw = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sw["config"]["sweep_method"] == "vs2pp" and np.array(sw["sweep"]["top1"]).shape == (1, 2)
    i = sweep.index("--retrieval-backbone")  # --retrieval-* flags without a backbone: refused up front
    assert main(sweep[:i] + sweep[i + 2:] + ["--out", str(tmp_path / "s2")]) == EXIT_USAGE
