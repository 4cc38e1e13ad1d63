"""The Python snippets of README.md and docs/*.md run as written (issue 22 item 5).

Every ```python block carries a marker comment on the line before it:

    <!-- snippet: run -->                   run as written, in an empty temporary folder
    <!-- snippet: run given=NAME (note) --> run after the setup `GIVEN[NAME]` (the names the prose takes as
                                            given: `model`, `images`, `sae`, ...)
    <!-- snippet: skip REASON -->           not run (it needs the Hub, a GPU, ...); REASON is the skip reason

Runs are offline (`HF_HUB_OFFLINE=1`), on the small CLIP trained in this repository
(`assets/tiny-clip-tinyimagenet`): a snippet's `HookedCLIP.from_pretrained("ViT-B-32", pretrained="openai")`
loads it instead (`OFFLINE`), and ViT-B/32's final block `blocks.11` is the small CLIP's `blocks.3`.
"""

from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "tiny-clip-tinyimagenet"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- snippet: (?P<marker>.*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
OFFLINE = {  # what a snippet names -> what the offline run uses
    'HookedCLIP.from_pretrained("ViT-B-32", pretrained="openai")':
        f'HookedCLIP.from_pretrained("local-dir:{ASSET}")',
    "blocks.11.": "blocks.3.",
}


def snippets() -> list:
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code"))
            found.append(pytest.param(m.group("marker"), m.group("code"), id=f"{path.relative_to(ROOT)}:{line}"))
    return found


SNIPPETS = snippets()


def _small_sae(model, hook: str, seed: int = 0):
    """A random top-k SAE with the metadata `train` records for `model` at `hook` (CLS)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_lens_vision_steer.core.identity import model_identity
    from sae_lens_vision_steer.sae.metadata import training_metadata

    torch.manual_seed(seed)
    d = model.cfg.d_model
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=4 * d, k=8)).requires_grad_(False)
    request = {**model_identity(model), "positions": "cls", "dataset": "tiny-imagenet", "split": "train"}
    for k, v in training_metadata(request, hook, "topk", [0.0] * d).items():
        setattr(sae.cfg.metadata, k, v)
    return sae


@functools.lru_cache(maxsize=1)
def _small_clip():
    """The small CLIP, loaded once, for building the files a snippet reads (never handed to a snippet)."""
    from sae_lens_vision_steer import HookedCLIP

    return HookedCLIP.from_pretrained(f"local-dir:{ASSET}")


def _images(folder: Path, names=("cat.jpg", "dog.jpg")) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = [folder / n for n in names]
    for p in paths:
        Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(p)
    return paths


def given_hooked(folder: Path) -> dict:
    """`model` (the small CLIP), `images`, `clean_images` / `corrupted_images` / `metric` (patching),
    `class_weights` `[E, C]`, `text_embeds` `[C, E]`, `class_index_per_image`, SAEs `sae`, `sae_a`, `sae_b`."""
    from sae_lens_vision_steer import HookedCLIP

    model = HookedCLIP.from_pretrained(f"local-dir:{ASSET}")
    images = torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in _images(folder)])
    with torch.no_grad():
        text_embeds = torch.nn.functional.normalize(
            model.encode_text(model.tokenize([f"a photo of a {c}." for c in ("cat", "dog", "car")])), dim=-1)
        clean_embed = model(images[:1])

    def metric(embed):
        return (embed - clean_embed).norm()

    final = model.steer_hook
    return {"model": model, "images": images, "clean_images": images[:1], "corrupted_images": images[1:],
            "metric": metric, "text_embeds": text_embeds, "class_weights": text_embeds.T,
            "class_index_per_image": torch.tensor([0, 1]), "sae": _small_sae(model, final),
            "sae_a": _small_sae(model, final, seed=1), "sae_b": _small_sae(model, "blocks.2.hook_resid_post", seed=2)}


GIVEN = {"hooked": given_hooked}


def test_every_python_block_is_marked():
    unmarked = [p.id for p in SNIPPETS if not p.values[0]]
    assert not unmarked, f"mark these blocks <!-- snippet: run --> or <!-- snippet: skip REASON -->: {unmarked}"
    assert sum(p.values[0].startswith("run") for p in SNIPPETS) >= 6


@pytest.mark.parametrize("marker, code", SNIPPETS)
def test_snippet_runs(marker, code, tmp_path, monkeypatch):
    if marker.startswith("skip"):
        pytest.skip(marker[len("skip"):].strip())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    for old, new in OFFLINE.items():
        code = code.replace(old, new)
    given = re.search(r"given=(\w+)", marker)
    namespace = {"__name__": "__snippet__"}
    if given:
        namespace.update(GIVEN[given.group(1)](tmp_path))
    if "runs/cifar100-b32/sae" in code:  # the README's VS2 snippet: an SAE of the small CLIP, two images
        model = namespace.get("model") or _small_clip()
        _small_sae(model, model.steer_hook).save_model(str(tmp_path / "runs" / "cifar100-b32" / "sae"))
        _images(tmp_path)
    exec(compile(code, "<snippet>", "exec"), namespace)  # noqa: S102  (our own documentation)
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
