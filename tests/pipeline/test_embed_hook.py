"""The other reading of "the final-layer CLS token" (docs/methods.md): VS2 on the post-projection image
embedding, `hook_image_embed`, with an SAE trained there, through the same pipeline."""

from __future__ import annotations

import json

import torch
from conftest import TINY_CLIP_KWARGS


def test_run_steers_the_image_embedding(tmp_path, tiny_imagenet_dir):
    from sae_lens_vision_steer.cli import main
    from sae_lens_vision_steer.sae.loading import load_sae

    out = tmp_path / "run"
    args = ["run", "--random-weights", "--seed", "5", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu",
            "--dataset", "tiny-imagenet", "--data-dir", str(tiny_imagenet_dir), "--train-limit", "200",
            "--eval-limit", "50", "--epochs", "2", "--k", "4", "--templates", "single", "--num-workers", "0",
            "--hook", "hook_image_embed", "--methods", "zeroshot,vs2", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    sae = load_sae(out / "sae")
    assert sae.cfg.metadata.hook_name == "hook_image_embed" and sae.cfg.d_in == TINY_CLIP_KWARGS["embed_dim"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["hook_name"] == "hook_image_embed" and list(saved["methods"]) == ["zeroshot", "vs2"]
    assert saved["methods"]["vs2"]["coverage"] == 1.0  # ungated: every image's embedding is steered
    assert torch.isfinite(torch.tensor(saved["methods"]["vs2"]["top1"]))


def test_the_embedding_hook_tokens_are_open_clips_image_embeddings(tiny_clip, tiny_imagenet_dir):
    from sae_lens_vision_steer.data import load_image_dataset, make_loader
    from sae_lens_vision_steer.evaluation.tokens import cache_hook_tokens, make_tower_tail

    data = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, tiny_clip.preprocess, limit=12)
    cached = cache_hook_tokens(tiny_clip, data, "hook_image_embed", batch_size=6, num_workers=0, show_progress=False)
    images = torch.cat([b.images for b in make_loader(data, batch_size=12, num_workers=0)])
    with torch.no_grad():
        want = tiny_clip.clip.encode_image(images)  # open_clip's own forward
    torch.testing.assert_close(cached.cls_ND, want, rtol=1e-5, atol=1e-5)
    tail = make_tower_tail(tiny_clip, cached)
    assert torch.equal(tail(cached.cls_ND), cached.cls_ND)  # nothing of the tower is left after the projection
