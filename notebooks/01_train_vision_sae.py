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
# # 01 · Train a vision SAE on CLIP activations
#
# 1. cache the CLS token of the final block of a CLIP image tower for a set of training images;
# 2. train a top-k sparse autoencoder (SAE) on it with SAELens;
# 3. inspect it: the fraction of variance it leaves unexplained (FVU), its sparsity (L0), the images
#    that activate a few latents most, and how often each latent fires.

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
# ## Cache activations
#
# `cache_activations` stores one row per image (`positions="cls"`) at the hook, with the image's label
# and its position in the data set (`cache.image_index`), which we use below to find the images.

# %%
from sae_lens_vision_steer.activation_cache import cache_activations

# One pass of the training images through the tower, keeping the CLS token at HOOK (sharded on
# disk; an identical cache that already exists is reused, an interrupted one is resumed).
cache = cache_activations(model, train_data, HOOK, RUN_DIR / "cache_train", positions="cls",
                          batch_size=BATCH_SIZE, num_workers=NUM_WORKERS, show_progress=SHOW_PROGRESS)
cache

# %% [markdown]
# ## Train a top-k SAE
#
# `c = TopK(W_enc (x - b_dec))`, `x_rec = W_dec c + b_dec`, trained on the reconstruction error with
# `b_dec` started at the mean activation, unit-norm decoder rows, a linear warm-up and decay of the
# learning rate, and SAELens' auxiliary loss for dead latents. The SAE is saved in SAELens' format
# (`sae_lens.SAE.load_from_disk` loads it), with the hook, model and data set in its metadata.

# %%
from sae_lens_vision_steer.training.trainer import train_sae

# A top-k SAE trained with SAELens' SAETrainer; 10% of the images are held out for evaluation.
# resume=True returns the finished SAE when this folder already holds the same run (from notebook
# 01, say); after changing a setting, delete the folder or pass overwrite=True.
run = train_sae(cache, HOOK, k=SAE_K, expansion_factor=SAE_EXPANSION, epochs=SAE_EPOCHS, batch_size=SAE_BATCH,
                seed=SEED, device=DEVICE, out_dir=RUN_DIR / "sae_topk", resume=True, show_progress=SHOW_PROGRESS)
sae = run.sae
print(f"SAE {sae.cfg.d_in} -> {sae.cfg.d_sae} latents, k {SAE_K}: held-out FVU {run.metrics['heldout_fvu']:.3f}")

# %% [markdown]
# ## FVU and L0
#
# FVU is `sum ||x - x_rec||^2 / sum ||x - mean(x)||^2` over the held-out images: 0 is a perfect
# reconstruction, 1 is no better than the mean. L0 is the number of latents active per image (at most
# k). The paper's ViT-B/32 SAEs reach an FVU of 0.28 (CIFAR-100) to 0.51 (Tiny-ImageNet).
# Below, the held-out FVU is also recomputed from the formula, independently of `train_sae`.

# %%
import numpy as np

from sae_lens_vision_steer.training.trainer import fvu_distribution, holdout_split

m = run.metrics
print(f"held-out FVU {m['heldout_fvu']:.4f} (train {m['train_fvu']:.4f}), mean L0 {m['heldout_mean_l0']:.2f} "
      f"of k = {SAE_K}, dead latents {m['dead_fraction']:.1%} of {sae.cfg.d_sae}")

# The same held-out images as train_sae (same fraction and seed), FVU written out:
_, heldout_rows = holdout_split(cache, 0.1, 0)
x = cache.load(HOOK, rows=heldout_rows)
with torch.no_grad():
    x_rec = sae(x.to(DEVICE)).cpu()
fvu_check = ((x - x_rec).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
print(f"recomputed held-out FVU {fvu_check:.4f}")
assert abs(fvu_check - m["heldout_fvu"]) < 1e-3

# Per-image FVU, ||x - x_rec||^2 / ||x - mu||^2: its quantiles are VS2's gate thresholds (notebook 02).
dist = fvu_distribution(sae, cache, HOOK)
print("per-image FVU quantiles:", {q: round(v, 3) for q, v in dist["quantiles"].items()})

# %% [markdown]
# ## Top-activating images
#
# Encode every cached image, pick a few latents that fire on some images but not on most, and show the
# images that activate each one most strongly. With real CLIP weights these grids tend to share a
# concept (a colour, a texture, an object); the small CLIP's latents are coarser (colours,
# layouts, a few object classes).

# %%
import matplotlib.pyplot as plt

N_LATENTS, N_TOP = 4, 8

acts_ND = cache.load(HOOK)  # every cached CLS token
with torch.no_grad():
    codes_NS = torch.cat([sae.encode(a.to(DEVICE)).cpu() for a in acts_ND.split(4096)])
print(f"mean L0 over all {len(codes_NS)} cached images: {(codes_NS > 0).sum(1).float().mean():.2f}")

fires_S = (codes_NS > 0).sum(0)
candidates = torch.nonzero((fires_S >= N_TOP) & (fires_S <= 0.2 * len(codes_NS))).flatten()
strongest = codes_NS[:, candidates].max(0).values.argsort(descending=True)
latents = candidates[strongest][:N_LATENTS].tolist()


def raw_image(data, position):
    """The unprocessed image at a position of the data set (what `cache.image_index` records)."""
    return data.load_image(position if data.indices is None else int(data.indices[position]))


fig, axes = plt.subplots(len(latents), N_TOP, figsize=(1.4 * N_TOP, 1.8 * len(latents)), squeeze=False)
for r, latent in enumerate(latents):
    values, rows = codes_NS[:, latent].topk(N_TOP)
    for c, (value, row) in enumerate(zip(values.tolist(), rows.tolist())):
        ax = axes[r, c]
        ax.imshow(raw_image(train_data, int(cache.image_index[row])))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{train_data.classnames[int(cache.labels[row])][:14]}\n{value:.2f}", fontsize=7)
    axes[r, 0].set_ylabel(f"latent {latent}\nfires on {int(fires_S[latent])}", fontsize=8)
fig.suptitle("Images that activate each latent most (class, activation)", fontsize=10)
fig.tight_layout()
fig.savefig(RUN_DIR / "01_top_images.png", dpi=100)
plt.show()

# %% [markdown]
# ## Latent firing frequency
#
# How often each latent fires over the training images, on a log10 scale, as saved with the SAE
# (`sparsity.safetensors`, the file SAELens and the Hub card use). With k of d_sae latents active per
# image the average frequency is k / d_sae (dashed line). Dead latents (never fired) are counted
# apart.

# %%
from sae_lens_vision_steer.sae.loading import load_vision_sae, log_feature_sparsity

_, info = load_vision_sae(run.out_dir)  # the saved SAE folder, as a user would load it
log_freq = log_feature_sparsity(info).numpy()  # log10 firing frequency per latent (-10 when it never fired)
dead = log_freq < -9
print(f"{int(dead.sum())} dead latents of {len(log_freq)}; median log10 frequency of the others "
      f"{np.median(log_freq[~dead]):.2f}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(log_freq[~dead], bins=40, color="tab:blue")
ax.axvline(np.log10(SAE_K / sae.cfg.d_sae), color="black", ls="--", lw=1, label="k / d_sae")
ax.set_xlabel("log10 firing frequency")
ax.set_ylabel("latents")
ax.set_title(f"{len(log_freq)} latents, {int(dead.sum())} dead (not shown)", fontsize=9)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(RUN_DIR / "01_latent_frequency.png", dpi=100)
plt.show()

# %% [markdown]
# ## The feature browser
#
# `build_feature_browser` (the `vision-steer features` command) writes a folder of HTML, JS and PNG
# that opens from disk: an index of every latent (firing frequency, mean activation, the classes its
# decoder direction promotes through `ln_post` and the projection), sortable and searchable, and a
# page per live latent with its top images and patch heatmaps, an activation histogram and per-class
# means. The statistics come from one pass over the cache. For this CLS-token SAE the heatmap is
# gradient x input at the patch embeddings: the first-order estimate of how much the latent drops when
# a patch is blanked, for one backward pass per image and latent (`heatmap="attention"` gives the
# cheaper CLS attention map, the same for every latent). Open `RUN_DIR / "features" / "index.html"`
# in a browser; below, a few latents are drawn inline from what the browser computed.

# %%
import json

from PIL import Image as PILImage

from sae_lens_vision_steer.explore import build_feature_browser, gradient_maps

browser = build_feature_browser(cache.root, sae, model, RUN_DIR / "features", top_k=6,
                                show_progress=SHOW_PROGRESS)
st = browser.stats
print(f"{browser.path / 'index.html'}: {len(st.alive)} latent pages, {len(st.dead)} dead latents listed; "
      f"statistics pass {browser.timing['stats_pass_s']:.2f} s, total {browser.timing['total_s']:.1f} s")
index_js = (browser.path / "index_data.js").read_text()
index_rows = {r["id"]: r for r in json.loads(index_js.split("=", 1)[1].rstrip().rstrip(";"))["latents"]}

shown = latents[:3]  # the latents of the grid above
grid = model.cfg.image_size // model.cfg.patch_size
fig, axes = plt.subplots(len(shown), 6, figsize=(9, 1.9 * len(shown)), squeeze=False)
for r, latent in enumerate(shown):
    images = [int(i) for i in st.top_images_SK[latent] if i >= 0]
    x = torch.stack([train_data[int(st.image_index_N[i])][0] for i in images])
    heat = [m[0] for m in gradient_maps(model, sae, x, [[latent]] * len(x), HOOK)]  # the latent pages' maps
    for c, ax in enumerate(axes[r]):
        ax.set_xticks([])
        ax.set_yticks([])
        if c < len(images):
            thumb = PILImage.open(browser.path / "images" / f"img_{images[c]:06d}.png")
            ax.imshow(thumb)
            ax.imshow(heat[c].reshape(grid, grid), cmap="Reds", alpha=0.45, extent=(0, thumb.width, thumb.height, 0))
    axes[r, 0].set_ylabel(f"latent {latent}", fontsize=8)
    axes[r, 0].set_title("promotes: " + ", ".join(index_rows[latent]["promoted"][:3]), fontsize=7, loc="left")
fig.suptitle("Feature browser: top images per latent, gradient x input heatmaps overlaid", fontsize=9)
fig.tight_layout()
fig.savefig(RUN_DIR / "01_feature_browser.png", dpi=100)
plt.show()

# %% [markdown]
# ## Summary
#
# The numbers this notebook produced, checked and saved next to the SAE.

# %%
import math

from sae_lens_vision_steer import save_json

summary = {
    "use_real_weights": USE_REAL_WEIGHTS, "dataset": DATASET, "n_cached_images": cache.n_rows,
    "d_sae": sae.cfg.d_sae, "k": SAE_K, "heldout_fvu": m["heldout_fvu"], "heldout_fvu_recomputed": fvu_check,
    "train_fvu": m["train_fvu"], "heldout_mean_l0": m["heldout_mean_l0"], "dead_fraction": m["dead_fraction"],
    "latents_shown": latents, "n_dead_latents": int(dead.sum()),
    "browser": {"path": str(browser.path), "alive": len(st.alive), "dead": len(st.dead), "top_k": 6},
}
assert all(math.isfinite(v) for v in (m["heldout_fvu"], m["train_fvu"], m["heldout_mean_l0"]))
assert 0 <= m["heldout_fvu"] < 1, "the SAE should explain some variance"
assert 0 < m["heldout_mean_l0"] <= SAE_K
save_json(RUN_DIR / "01_summary.json", summary)
summary
