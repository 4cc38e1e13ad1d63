# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Interpret CLIP like a HookedTransformer
#
# `HookedCLIP` is a TransformerLens `HookedRootModule` with TL's hook names inside every block
# (`ln1.hook_scale`, `attn.hook_q|k|v|z|attn_scores|pattern`, `mlp.hook_pre|post`, the residual
# hooks), a `HookedTransformerConfig` as `model.cfg`, and TL's `ActivationCache` from
# `run_with_cache`. So TL's own tools work on an image tower. This notebook:
#
# 1. draws the CLS token's attention to the patches over the image;
# 2. ablates attention heads through `hook_z`;
# 3. splices the SAE in (the `HookedSAETransformer` way) and reads an image's top latents from the cache;
# 4. runs a logit lens over the blocks with `accumulated_resid` and `apply_ln_to_stack`.

# %% tags=["parameters"]
import os
from pathlib import Path

# The shared Tiny-ImageNet-200 folder (the default is relative to this notebook's folder).
DATA_DIR = Path(os.environ.get("TINY_IMAGENET_DIR", "../../shared/datasets/tiny-imagenet-200"))
# Caches, SAEs and plots go here (`runs/` is git-ignored). The three notebooks share it: 02 and 03
# reuse the activation cache and the SAE that 01 made with the same settings.
RUN_ROOT = Path(os.environ.get("VISION_STEER_RUN_DIR", "../runs/notebooks"))
# The small CLIP trained on Tiny-ImageNet by scripts/train_tiny_clip.py (committed, about 8 MB).
TINY_CLIP_DIR = Path(os.environ.get("VISION_STEER_TINY_CLIP", "../assets/tiny-clip-tinyimagenet"))
SEED = 0
N_TRAIN_IMAGES = 3000  # default path: images evenly spaced over the 200 classes
N_EVAL_IMAGES = 2000

# %% [markdown]
# ## Use real CLIP weights
#
# By default this notebook runs in about a minute on a CPU: the **small CLIP trained here** on the
# shared Tiny-ImageNet training images (`scripts/train_tiny_clip.py`, committed as
# `assets/tiny-clip-tinyimagenet`: 32-pixel images, 4 blocks of width 128, loaded with open_clip's
# `local-dir:` name) on a few thousand images of the shared Tiny-ImageNet folder.
# Set `USE_REAL_WEIGHTS = True` to run the same code on CLIP ViT-B/32 with OpenAI's weights and the
# full CIFAR-100 from the Hugging Face Hub (train: 50,000 images for the activation cache, the SAE
# and the VS2++ pool; test: 10,000 images for evaluation), with the paper's SAE (expansion 4, k 64).
# That needs network access the first time (weights and data are cached afterwards) and, to finish in
# minutes rather than hours, a GPU.

# %%
USE_REAL_WEIGHTS = False

# %%
import torch

from sae_lens_vision_steer import HookedCLIP, load_image_dataset

if USE_REAL_WEIGHTS:
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    model = HookedCLIP.from_pretrained("ViT-B-32", pretrained="openai", device=DEVICE)
    DATASET = "cifar100"
    train_data = load_image_dataset(DATASET, "train", transform=model.preprocess)  # 50,000 images
    eval_data = load_image_dataset(DATASET, "test", transform=model.preprocess)  # 10,000 images
    SAE_K, SAE_EXPANSION, SAE_EPOCHS, SAE_BATCH = 64, 4, 10, 256  # the paper's ViT-B/32 SAE
    TEMPLATES = "cifar"  # CLIP's 18 prompt templates for CIFAR
    BATCH_SIZE, NUM_WORKERS, SHOW_PROGRESS = 256, 4, True
    RUN_DIR = RUN_ROOT / "cifar100_vit-b-32-openai"
else:
    if not (DATA_DIR / "wnids.txt").is_file():
        raise FileNotFoundError(f"no Tiny-ImageNet-200 folder at {DATA_DIR.resolve()}; "
                                "set the TINY_IMAGENET_DIR environment variable or DATA_DIR above")
    DEVICE = "cpu"
    torch.set_num_threads(1)  # matrices this small gain nothing from threads (and CPUs are often shared)
    # The small CLIP trained by scripts/train_tiny_clip.py, in open_clip's local-dir: layout.
    model = HookedCLIP.from_pretrained(f"local-dir:{TINY_CLIP_DIR}")
    DATASET = "tiny-imagenet"
    train_data = load_image_dataset(DATASET, "train", data_dir=DATA_DIR, transform=model.preprocess,
                                    limit=N_TRAIN_IMAGES)
    eval_data = load_image_dataset(DATASET, "val", data_dir=DATA_DIR, transform=model.preprocess,
                                   limit=N_EVAL_IMAGES)
    SAE_K, SAE_EXPANSION, SAE_EPOCHS, SAE_BATCH = 16, 4, 5, 128
    TEMPLATES = "imagenet"  # CLIP's 80 ImageNet templates, the ones the small CLIP was trained with
    BATCH_SIZE, NUM_WORKERS, SHOW_PROGRESS = 256, 0, True
    RUN_DIR = RUN_ROOT / "tiny-imagenet_tiny-clip"

# The paper's SAE sits on the CLS token at the output of the final block.
HOOK = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
RUN_DIR.mkdir(parents=True, exist_ok=True)
print(f"model {model.cfg.model_name}{'/' + model.cfg.pretrained if model.cfg.pretrained else ''}: {model.cfg.n_layers} blocks, d_model {model.cfg.d_model}, "
      f"{model.cfg.image_size}px images; hook {HOOK}")
print(f"{DATASET}: {len(train_data)} train images, {len(eval_data)} {eval_data.split} images, "
      f"{len(eval_data.classnames)} classes; outputs in {RUN_DIR}")

# %% [markdown]
# **About the numbers.** With `USE_REAL_WEIGHTS = False` the model is the small CLIP trained on
# Tiny-ImageNet's training images (`assets/tiny-clip-tinyimagenet`, see the setup cell): its zero-shot
# top-1 is far above chance (1 in 200 classes, 0.5%) but far below a real CLIP's, and the
# differences between methods come from a couple of thousand images, so small ones are noise.
# `README.md` and `assets/tiny-clip-tinyimagenet/RESULTS.md` give every method on all 10,000 val
# images. Set `USE_REAL_WEIGHTS = True` for ViT-B/32 (the paper reports, on CIFAR-100: zero-shot
# 61.07, VS2 64.52, VS2++ 77.11, VS2++ oracle 81.95, VS2 + PASS 70.64).

# %% [markdown]
# ## A TransformerLens cache of an image batch
#
# A batch of evaluation images, and the zero-shot head (class-prompt embeddings) that turns image
# embeddings into class logits.

# %%
from transformer_lens import ActivationCache

from sae_lens_vision_steer import ZeroShotClassifier, make_loader

N_IMAGES = 256
batch = next(iter(make_loader(eval_data, N_IMAGES, num_workers=0)))
images, labels = batch.images.to(DEVICE), batch.labels
classifier = ZeroShotClassifier(model, eval_data.classnames, TEMPLATES, show_progress=SHOW_PROGRESS)
with torch.no_grad():
    embeds, tl_cache = model.run_with_cache(images)
assert isinstance(tl_cache, ActivationCache)  # TL's own cache class
clean_logits = classifier.logits(embeds).cpu()
clean_top1 = (clean_logits.argmax(-1) == labels).float().mean().item() * 100
L = model.cfg.n_layers - 1
print(f"{len(tl_cache)} cached activations; top-1 on these {N_IMAGES} images {clean_top1:.2f}%")
for name in (f"blocks.{L}.attn.hook_pattern", f"blocks.{L}.attn.hook_z", f"blocks.{L}.mlp.hook_post", "hook_ln_post"):
    print(f"  {name:32s} {tuple(tl_cache[name].shape)}")

# %% [markdown]
# ## The CLS token's attention to the patches
#
# `hook_pattern` is `[batch, head, query, key]`. Row 0 is what the CLS token attends to; without the
# CLS column, reshaped to the patch grid and drawn over the image, it shows where the last block's
# CLS looks.

# %%
import matplotlib.pyplot as plt
import torch.nn.functional as F

grid = model.cfg.image_size // model.cfg.patch_size
pattern = tl_cache[f"blocks.{L}.attn.hook_pattern"]  # [B, H, T, T]
cls_to_patches = pattern[:, :, 0, 1:].mean(1).reshape(-1, 1, grid, grid)  # averaged over heads
heat = F.interpolate(cls_to_patches, size=images.shape[-2:], mode="nearest")[:, 0].cpu()

def show_image(t):
    t = t.cpu().permute(1, 2, 0)
    return ((t - t.min()) / (t.max() - t.min())).numpy()

N_SHOW = 6
fig, axes = plt.subplots(1, N_SHOW, figsize=(2 * N_SHOW, 2.3))
for i, ax in enumerate(axes):
    ax.imshow(show_image(images[i]))
    ax.imshow(heat[i].numpy(), alpha=0.5, cmap="inferno")
    ax.set_title(eval_data.classnames[int(labels[i])][:16], fontsize=8)
    ax.axis("off")
fig.suptitle(f"Block {L}: CLS attention to the patches (mean over heads)", fontsize=10)
fig.tight_layout()
fig.savefig(RUN_DIR / "04_cls_attention.png", dpi=100)
plt.show()
print("each CLS row sums to 1:", torch.allclose(pattern[:, :, 0].sum(-1), torch.ones(()), atol=1e-5))


# %% [markdown]
# ## Head ablation
#
# Zero one head's output `z` (`[batch, pos, head, d_head]`) in the last block and measure how much the
# correct-class logit drops, head by head.

# %%
def ablate_head(head):
    def hook(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z
    return hook

def correct_logit(logits):
    return logits[torch.arange(len(labels)), labels].mean().item()

head_effect = {}
with torch.no_grad():
    for h in range(model.cfg.n_heads):
        out = model.run_with_hooks(images, fwd_hooks=[(f"blocks.{L}.attn.hook_z", ablate_head(h))])
        head_effect[h] = correct_logit(classifier.logits(out).cpu()) - correct_logit(clean_logits)
        print(f"block {L} head {h}: correct-class logit {head_effect[h]:+.4f}")

# %% [markdown]
# ## The SAE spliced in, and an image's top latents
#
# The SAE from notebook 01 (trained here if 01 has not run). `add_sae` splices it at its hook at the
# positions it was trained on (the CLS token only), with SAELens' cache keys
# (`<hook>.hook_sae_acts_post`, ...). With `use_error_term=True` the model's output is unchanged.

# %%
from sae_lens_vision_steer.activation_cache import cache_activations

# One pass of the training images through the tower, keeping the CLS token at HOOK (sharded on
# disk; an identical cache that already exists is reused, an interrupted one is resumed).
cache = cache_activations(model, train_data, HOOK, RUN_DIR / "cache_train", positions="cls",
                          batch_size=BATCH_SIZE, num_workers=NUM_WORKERS, show_progress=SHOW_PROGRESS)
cache

# %%
from sae_lens_vision_steer.training.trainer import train_sae

# A top-k SAE trained with SAELens' SAETrainer; 10% of the images are held out for evaluation.
# resume=True returns the finished SAE when this folder already holds the same run (from notebook
# 01, say); after changing a setting, delete the folder or pass overwrite=True.
run = train_sae(cache, HOOK, k=SAE_K, expansion_factor=SAE_EXPANSION, epochs=SAE_EPOCHS, batch_size=SAE_BATCH,
                seed=SEED, device=DEVICE, out_dir=RUN_DIR / "sae_topk", resume=True, show_progress=SHOW_PROGRESS)
sae = run.sae
print(f"SAE {sae.cfg.d_in} -> {sae.cfg.d_sae} latents, k {SAE_K}: held-out FVU {run.metrics['heldout_fvu']:.3f}")

# %%
model.add_sae(sae, use_error_term=True)
try:
    with torch.no_grad():
        spliced, sae_cache = model.run_with_cache(images, names_filter=lambda n: n.startswith(HOOK))
finally:
    model.reset_saes()
splice_max_diff = (spliced - embeds).abs().max().item()
print(f"with the error term the output is unchanged: max |diff| {splice_max_diff:.2e}")
acts = sae_cache[HOOK + ".hook_sae_acts_post"][:, 0]  # [B, d_sae]: the CLS token only
values, latents_top = acts[0].topk(5)
print(f"image 0 ({eval_data.classnames[int(labels[0])]}): top latents",
      {int(l): round(float(v), 3) for l, v in zip(latents_top, values)})
print(f"mean L0 over the batch: {(acts > 0).sum(-1).float().mean():.2f}")

# %% [markdown]
# ## An SAE from another library, and its top latents
#
# `load_vision_sae` also reads SAEs trained with EleutherAI sparsify, ViT-Prisma, saev, ViSAEBench and
# overcomplete, as SAELens SAEs with this package's metadata, exactly or not at all
# ([docs/sae-sources.md](../docs/sae-sources.md)). With network access, for example,
# `load_vision_sae("Prisma-Multimodal/sae-top_k-64-cls_only-layer_11-hook_resid_post", format="prisma")`
# reads a ViT-Prisma CLS SAE for `hf-hub:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K`. Offline, this cell
# writes the SAE above in sparsify's files (`cfg.json` + `sae.safetensors`, as `SparseCoder.save_to_disk`
# writes them), reads them back as an imported SAE and looks at the same image's top latents.

# %%
import copy
import json

from safetensors.torch import save_file

from sae_lens_vision_steer import ImportOptions, load_vision_sae

unit = copy.deepcopy(sae)
unit.fold_W_dec_norm()  # sparsify takes the top k with unit-norm decoder rows; the latents do not change
export = RUN_DIR / "sparsify_export" / f"layers.{model.cfg.n_layers - 1}"  # sparsify names folders by module
export.mkdir(parents=True, exist_ok=True)
(export / "cfg.json").write_text(json.dumps({
    "activation": "topk", "expansion_factor": SAE_EXPANSION, "normalize_decoder": True, "num_latents": unit.cfg.d_sae,
    "k": SAE_K, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": unit.cfg.d_in}))
save_file({"encoder.weight": unit.W_enc.T.contiguous(), "encoder.bias": unit.b_enc.contiguous(),
           "W_dec": unit.W_dec.contiguous(), "b_dec": unit.b_dec.contiguous()}, str(export / "sae.safetensors"))

imported, info = load_vision_sae(export, options=ImportOptions(model_name=model.cfg.model_name, positions="cls"))
print(f"{info.format} files -> SAELens {imported.cfg.architecture()} SAE at {info.hook_name}, "
      f"positions {info.positions}")
model.add_sae(imported, use_error_term=True)
try:
    with torch.no_grad():
        _, imported_cache = model.run_with_cache(images, names_filter=lambda n: n.startswith(HOOK))
finally:
    model.reset_saes()
imported_acts = imported_cache[HOOK + ".hook_sae_acts_post"][:, 0]
imported_values, imported_top = imported_acts[0].topk(5)
print("imported SAE, image 0: top latents", {int(l): round(float(v), 3) for l, v in zip(imported_top, imported_values)})
imported_max_diff = (imported_acts - acts).abs().max().item()
print(f"latents of the imported SAE vs the SAE above: max |diff| {imported_max_diff:.2e}")

# %% [markdown]
# ## A logit lens over the blocks
#
# `accumulated_resid` stacks the residual stream (CLS token) before and in the middle of each block;
# `apply_ln_to_stack` applies the final LayerNorm's cached scale (TL's `ln_final`, open_clip's
# `ln_post`); the projection and the class-prompt directions then give class logits per layer. The
# last row is the model's own zero-shot prediction.

# %%
with torch.no_grad():
    stack, lens_labels = tl_cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=0, return_labels=True)
    normed = tl_cache.apply_ln_to_stack(stack, layer=-1, pos_slice=0)  # [layers, B, D]
    ln = model.ln_final
    lens_embeds = (normed * ln.w + ln.b) @ model.visual.proj
    lens_logits = torch.stack([classifier.logits(e).cpu() for e in lens_embeds])
lens_top1 = [(l.argmax(-1) == labels).float().mean().item() * 100 for l in lens_logits]
lens_final_max_diff = (lens_logits[-1] - clean_logits).abs().max().item()
print(f"final layer of the lens vs the model's logits: max |diff| {lens_final_max_diff:.2e}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(range(len(lens_top1)), lens_top1, marker="o")
ax.set_xticks(range(len(lens_labels)), lens_labels, rotation=45, fontsize=7)
ax.set_ylabel("top-1 (%)")
ax.set_title("Logit lens: zero-shot accuracy read from each layer's CLS token", fontsize=9)
fig.tight_layout()
fig.savefig(RUN_DIR / "04_logit_lens.png", dpi=100)
plt.show()

# %% [markdown]
# ## Summary

# %%
from sae_lens_vision_steer import save_json

summary = {
    "use_real_weights": USE_REAL_WEIGHTS, "n_images": N_IMAGES, "clean_top1": clean_top1,
    "head_effect": head_effect, "splice_max_diff": splice_max_diff, "top_latents_image0": latents_top.tolist(),
    "lens_labels": lens_labels, "lens_top1": lens_top1, "lens_final_max_diff": lens_final_max_diff,
    "imported_format": info.format, "imported_top_latents_image0": imported_top.tolist(),
    "imported_max_diff": imported_max_diff,
}
assert splice_max_diff < 1e-4 and lens_final_max_diff < 1e-3 and imported_max_diff < 1e-4
save_json(RUN_DIR / "04_summary.json", summary)
summary
