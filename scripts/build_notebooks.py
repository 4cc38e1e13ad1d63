"""Write the tutorial notebooks in `notebooks/` from the Python source below (with nbformat).

The notebooks are generated, not hand-edited: change the cells here and run

    python scripts/build_notebooks.py            # (re)write notebooks/*.ipynb, without outputs
    python scripts/build_notebooks.py --check    # exit 1 if a notebook differs from this source

Cells shared by the three notebooks (parameters, the real-weights switch, model and data, the
activation cache and the SAE) are written once here. Cell ids are fixed so that the output is
byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

# ---------------------------------------------------------------------------------- shared cells
PARAMETERS = '''\
import os
from pathlib import Path

# The shared Tiny-ImageNet-200 folder (the default is relative to this notebook's folder).
DATA_DIR = Path(os.environ.get("TINY_IMAGENET_DIR", "../../shared/datasets/tiny-imagenet-200"))
# Caches, SAEs and plots go here (`runs/` is git-ignored). The three notebooks share it: 02 and 03
# reuse the activation cache and the SAE that 01 made with the same settings.
RUN_ROOT = Path(os.environ.get("VISION_STEER_RUN_DIR", "../runs/notebooks"))
SEED = 0
N_TRAIN_IMAGES = 3000  # random-weights demo: images evenly spaced over the 200 classes
N_EVAL_IMAGES = 2000'''

REAL_WEIGHTS_MD = '''\
## Use real CLIP weights

By default this notebook runs in under a minute on a CPU: a tiny CLIP with **random weights**
(32-pixel images, 2 blocks of width 64) on a few thousand images of the shared Tiny-ImageNet folder.
Set `USE_REAL_WEIGHTS = True` to run the same code on CLIP ViT-B/32 with OpenAI's weights and the
full CIFAR-100 from the Hugging Face Hub (train: 50,000 images for the activation cache, the SAE
and the VS2++ pool; test: 10,000 images for evaluation), with the paper's SAE (expansion 4, k 64).
That needs network access the first time (weights and data are cached afterwards) and, to finish in
minutes rather than hours, a GPU.'''

USE_REAL_WEIGHTS = '''\
USE_REAL_WEIGHTS = False'''

SETUP = '''\
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
    torch.manual_seed(SEED)  # the random weights: the same seed gives the same model in all three notebooks
    model = HookedCLIP.from_pretrained(
        "ViT-B-32", pretrained=None, embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=16, width=32, heads=2, layers=1))
    DATASET = "tiny-imagenet"
    train_data = load_image_dataset(DATASET, "train", data_dir=DATA_DIR, transform=model.preprocess,
                                    limit=N_TRAIN_IMAGES)
    eval_data = load_image_dataset(DATASET, "val", data_dir=DATA_DIR, transform=model.preprocess,
                                   limit=N_EVAL_IMAGES)
    SAE_K, SAE_EXPANSION, SAE_EPOCHS, SAE_BATCH = 8, 4, 5, 128
    TEMPLATES = "single"  # "a photo of a {}.": a random text tower gains nothing from prompt ensembles
    BATCH_SIZE, NUM_WORKERS, SHOW_PROGRESS = 256, 0, False
    RUN_DIR = RUN_ROOT / "tiny-imagenet_tiny-random-clip"

# The paper's SAE sits on the CLS token at the output of the final block.
HOOK = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
RUN_DIR.mkdir(parents=True, exist_ok=True)
print(f"model {model.cfg.model_name}/{model.cfg.pretrained}: {model.cfg.n_layers} blocks, d_model {model.cfg.d_model}, "
      f"{model.cfg.image_size}px images; hook {HOOK}")
print(f"{DATASET}: {len(train_data)} train images, {len(eval_data)} {eval_data.split} images, "
      f"{len(eval_data.classnames)} classes; outputs in {RUN_DIR}")'''

CACHE = '''\
from sae_lens_vision_steer.activation_cache import cache_activations

# One pass of the training images through the tower, keeping the CLS token at HOOK (sharded on
# disk; an identical cache that already exists is reused, an interrupted one is resumed).
cache = cache_activations(model, train_data, HOOK, RUN_DIR / "cache_train", positions="cls",
                          batch_size=BATCH_SIZE, num_workers=NUM_WORKERS, show_progress=SHOW_PROGRESS)
cache'''

TRAIN_SAE = '''\
from sae_lens_vision_steer.training import train_sae

# A top-k SAE trained with SAELens' SAETrainer; 10% of the images are held out for evaluation.
# resume=True returns the finished SAE when this folder already holds the same run (from notebook
# 01, say); after changing a setting, delete the folder or pass overwrite=True.
run = train_sae(cache, HOOK, k=SAE_K, expansion_factor=SAE_EXPANSION, epochs=SAE_EPOCHS, batch_size=SAE_BATCH,
                seed=SEED, device=DEVICE, out_dir=RUN_DIR / "sae_topk", resume=True, show_progress=SHOW_PROGRESS)
sae = run.sae
print(f"SAE {sae.cfg.d_in} -> {sae.cfg.d_sae} latents, k {SAE_K}: held-out FVU {run.metrics['heldout_fvu']:.3f}")'''

CHANCE_MD = '''\
**About the numbers.** With `USE_REAL_WEIGHTS = False` the CLIP towers are random, so every
accuracy below is at chance (1 in {n_classes} classes, about {chance}) and the differences between
methods are noise from a couple of thousand images. They show that the code runs end to end, not
that a method works. Set `USE_REAL_WEIGHTS = True` for real numbers (the paper reports, for
ViT-B/32 on CIFAR-100: zero-shot 61.07, VS2 64.52, VS2++ 77.11, VS2++ oracle 81.95, VS2 + PASS 70.64).'''


def chance_md() -> str:
    return CHANCE_MD.format(n_classes=200, chance="0.5%")


# ---------------------------------------------------------------------------------- 01
def notebook_01() -> list:
    return [
        md('''\
# 01 · Train a vision SAE on CLIP activations

1. cache the CLS token of the final block of a CLIP image tower for a set of training images;
2. train a top-k sparse autoencoder (SAE) on it with SAELens;
3. inspect it: the fraction of variance it leaves unexplained (FVU), its sparsity (L0), the images
   that activate a few latents most, and how often each latent fires.'''),
        code(PARAMETERS, tags=["parameters"]),
        md(REAL_WEIGHTS_MD),
        code(USE_REAL_WEIGHTS),
        code(SETUP),
        md('''\
## Cache activations

`cache_activations` stores one row per image (`positions="cls"`) at the hook, with the image's label
and its position in the data set (`cache.image_index`), which we use below to find the images.'''),
        code(CACHE),
        md('''\
## Train a top-k SAE

`c = TopK(W_enc (x - b_dec))`, `x_rec = W_dec c + b_dec`, trained on the reconstruction error with
`b_dec` started at the mean activation, unit-norm decoder rows, a linear warm-up and decay of the
learning rate, and SAELens' auxiliary loss for dead latents. The SAE is saved in SAELens' format
(`sae_lens.SAE.load_from_disk` loads it), with the hook, model and data set in its metadata.'''),
        code(TRAIN_SAE),
        md('''\
## FVU and L0

FVU is `sum ||x - x_rec||^2 / sum ||x - mean(x)||^2` over the held-out images: 0 is a perfect
reconstruction, 1 is no better than the mean. L0 is the number of latents active per image (at most
k). The paper's ViT-B/32 SAEs reach an FVU of 0.28 (CIFAR-100) to 0.51 (Tiny-ImageNet).
Below, the held-out FVU is also recomputed from the formula, independently of `train_sae`.'''),
        code('''\
import numpy as np

from sae_lens_vision_steer.training import fvu_distribution, holdout_split

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
print("per-image FVU quantiles:", {q: round(v, 3) for q, v in dist["quantiles"].items()})'''),
        md('''\
## Top-activating images

Encode every cached image, pick a few latents that fire on some images but not on most, and show the
images that activate each one most strongly. With real CLIP weights these grids tend to share a
concept (a colour, a texture, an object); with random weights they show whatever low-level
statistics the random tower happens to pick up.'''),
        code('''\
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
        ax.set_title(f"{train_data.classnames[int(cache.labels[row])][:14]}\\n{value:.2f}", fontsize=7)
    axes[r, 0].set_ylabel(f"latent {latent}\\nfires on {int(fires_S[latent])}", fontsize=8)
fig.suptitle("Images that activate each latent most (class, activation)", fontsize=10)
fig.tight_layout()
fig.savefig(RUN_DIR / "01_top_images.png", dpi=100)
plt.show()'''),
        md('''\
## Latent firing frequency

How often each latent fires over the training images, on a log10 scale, as saved with the SAE
(`sparsity.safetensors`, the file SAELens and the Hub card use). With k of d_sae latents active per
image the average frequency is k / d_sae (dashed line). Dead latents (never fired) are counted
apart.'''),
        code('''\
from sae_lens_vision_steer.hub import load_vision_sae, log_feature_sparsity

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
plt.show()'''),
        md('''\
## Summary

The numbers this notebook produced, checked and saved next to the SAE.'''),
        code('''\
import math

from sae_lens_vision_steer.cli.common import write_json_atomic

summary = {
    "use_real_weights": USE_REAL_WEIGHTS, "dataset": DATASET, "n_cached_images": cache.n_rows,
    "d_sae": sae.cfg.d_sae, "k": SAE_K, "heldout_fvu": m["heldout_fvu"], "heldout_fvu_recomputed": fvu_check,
    "train_fvu": m["train_fvu"], "heldout_mean_l0": m["heldout_mean_l0"], "dead_fraction": m["dead_fraction"],
    "latents_shown": latents, "n_dead_latents": int(dead.sum()),
}
assert all(math.isfinite(v) for v in (m["heldout_fvu"], m["train_fvu"], m["heldout_mean_l0"]))
assert 0 <= m["heldout_fvu"] < 1, "the SAE should explain some variance"
assert 0 < m["heldout_mean_l0"] <= SAE_K
write_json_atomic(RUN_DIR / "01_summary.json", summary)
summary'''),
    ]


# ---------------------------------------------------------------------------------- 02
def notebook_02() -> list:
    return [
        md('''\
# 02 · VS2: visual sparse steering of CLIP zero-shot classification

VS2 (Chatzoudis et al., arXiv 2506.01247, Eq. 2) steers the final CLS token `x` with the SAE's own
reading of it: with `c = encode(x)`,

    v     = D(gamma c) - D(c) = (gamma - 1) W_dec c
    x_hat = (x + lam v) * ||x|| / ||x + lam v||

and a gate leaves an image unsteered when the SAE reconstructs it badly (per-image FVU above the
q-quantile of the training images' FVU). This notebook compares zero-shot CLIP with VS2 through
TransformerLens hooks, then uses the evaluation runner for the per-class gains and a lam x gamma
sweep from a single backbone pass.'''),
        code(PARAMETERS + '''
LAM, GAMMA = 2.1, 1.5  # the paper's best setting for CIFAR-100 with ViT-B/32
FVU_QUANTILE = 0.95  # the gate: steer images whose FVU is at most this quantile of the training FVU
SWEEP_LAMS = [0.5, 1.0, 2.1, 3.0]
SWEEP_GAMMAS = [1.25, 1.5, 2.0]''', tags=["parameters"]),
        md(REAL_WEIGHTS_MD),
        code(USE_REAL_WEIGHTS),
        code(SETUP),
        md('''\
## The SAE

The activation cache of the training images and the SAE, as in notebook 01 (reused from the run
folder when 01 already made them with these settings).'''),
        code(CACHE),
        code(TRAIN_SAE),
        md(chance_md()),
        md('''\
## Zero-shot vs VS2 through `model.hooks`

`VS2Steering(...).fwd_hooks(model)` is a list of TransformerLens forward hooks on the SAE's hook
point. Inside `with model.hooks(fwd_hooks=...)` every forward pass is steered; outside it the model
is plain CLIP again. The gate's threshold `tau` is the `FVU_QUANTILE` quantile of the per-image FVU
over the (unlabeled) training activations.'''),
        code('''\
from sae_lens_vision_steer import ZeroShotClassifier, accuracy_metrics, make_loader
from sae_lens_vision_steer.steering import VS2Steering, fvu_threshold_from_reference

classifier = ZeroShotClassifier(model, eval_data.classnames, TEMPLATES, show_progress=SHOW_PROGRESS)
tau = fvu_threshold_from_reference(sae, cache.root, FVU_QUANTILE)
steer = VS2Steering(sae, lam=LAM, gamma=GAMMA, fvu_threshold=tau)
hooks = steer.fwd_hooks(model)  # checks the hook exists and fits the SAE's width
print(steer, f"\\ntau = {tau:.4f}")

plain_logits, steered_logits, labels = [], [], []
with torch.no_grad():
    for batch in make_loader(eval_data, BATCH_SIZE, NUM_WORKERS):
        images = batch.images.to(DEVICE)
        plain_logits.append(classifier.logits(model.encode_image(images)).cpu())
        with model.hooks(fwd_hooks=hooks):
            steered_logits.append(classifier.logits(model.encode_image(images)).cpu())
        labels.append(batch.labels)
labels = torch.cat(labels)
zeroshot_hooks = accuracy_metrics(torch.cat(plain_logits), labels)
vs2_hooks = accuracy_metrics(torch.cat(steered_logits), labels)
print(f"zero-shot top-1 {zeroshot_hooks.top1:.2f}, VS2 top-1 {vs2_hooks.top1:.2f} "
      f"({vs2_hooks.top1 - zeroshot_hooks.top1:+.2f}); {steer.total_coverage:.1%} of the images were steered")'''),
        md('''\
## The evaluation runner: one backbone pass

`Evaluator` runs the backbone once, up to the hook, and keeps the evaluation images' CLS tokens.
Every method and setting then only maps those tokens through the rest of the tower (here `ln_post`
and the projection), so a table of methods and a whole sweep cost one pass over the images. Its VS2
row must agree with the hooked passes above.'''),
        code('''\
from IPython.display import Image, display

from sae_lens_vision_steer.evaluation import EvaluationResult, Evaluator, MethodSpec

ev = Evaluator(model, eval_data, sae, classifier, batch_size=BATCH_SIZE, num_workers=NUM_WORKERS,
               show_progress=SHOW_PROGRESS, fvu_threshold=tau)
specs = [
    MethodSpec("zeroshot", "zeroshot"),
    MethodSpec("vs2", "vs2", {"lam": LAM, "gamma": GAMMA}),
    MethodSpec("rec_final", "rec_final"),  # the CLS token replaced by its SAE reconstruction
    MethodSpec("rec_final_gamma", "rec_final_gamma", {"gamma": GAMMA}),  # ... reconstructed from gamma c
]
rows = {spec.label: ev.score(spec) for spec in specs}
result = EvaluationResult(
    config={"model": model.cfg.model_name, "pretrained": model.cfg.pretrained, "dataset": DATASET,
            "split": eval_data.split, "lam": LAM, "gamma": GAMMA, "fvu_threshold": tau},
    classnames=list(eval_data.classnames), methods=rows, timing={"backbone_s": ev.cached.seconds})
print(result.table())

agreement = float((rows["vs2"].predictions == vs2_hooks.predictions).mean())
print(f"\\nVS2 predictions, runner vs hooked passes: {agreement:.2%} identical; "
      f"coverage {rows['vs2'].coverage:.3f} vs {steer.total_coverage:.3f}")
assert agreement > 0.99 and abs(rows["vs2"].coverage - steer.total_coverage) < 1e-6'''),
        md('''\
## Per-class gains

VS2 changes some classes far more than the average: the paper reports single classes moving by up
to 25 points. The plot shows the classes it helps most (green) and hurts most (red), in points of
per-class top-1 against zero-shot.'''),
        code('''\
written = result.save(RUN_DIR / "02_eval")  # results.json, results.md, one per-class plot per method
display(Image(filename=str(written["plot:vs2"])))'''),
        md('''\
## lam x gamma sweep

VS2's top-1 minus zero-shot over a small grid, from the same cached tokens (no new backbone pass).
The paper's good band is lam * gamma in [2, 3]. Note that choosing the best cell on the evaluation
images tunes on the test set; the runner records that (`selected_on="eval"`). A fair choice uses
held-out training images instead.'''),
        code('''\
from sae_lens_vision_steer.evaluation import plot_sweep_heatmap, sweep_vs2

sweep = sweep_vs2(ev, SWEEP_LAMS, SWEEP_GAMMAS, selected_on="eval", fvu_threshold=tau,
                  show_progress=SHOW_PROGRESS)
best_lam, best_gamma, best_top1 = sweep.best
print(f"best cell: lam {best_lam}, gamma {best_gamma}: top-1 {best_top1:.2f} "
      f"(zero-shot {sweep.zeroshot_top1:.2f}); backbone passes so far: {ev.n_backbone_passes}")
display(Image(filename=str(plot_sweep_heatmap(sweep, RUN_DIR / "02_sweep.png"))))'''),
        md('''\
## Summary'''),
        code('''\
import math

import numpy as np

from sae_lens_vision_steer.cli.common import write_json_atomic

summary = {
    "use_real_weights": USE_REAL_WEIGHTS, "dataset": DATASET, "n_eval_images": len(labels), "tau": tau,
    "hooks": {"zeroshot_top1": zeroshot_hooks.top1, "vs2_top1": vs2_hooks.top1, "vs2_coverage": steer.total_coverage},
    "runner": {label: {"top1": s.top1, "delta_top1": s.delta_top1, "coverage": s.coverage} for label, s in rows.items()},
    "runner_hooks_agreement": agreement, "n_backbone_passes": ev.n_backbone_passes,
    "sweep": sweep.to_json(),
}
assert ev.n_backbone_passes == 1, "the table and the sweep should share one backbone pass"
assert all(math.isfinite(s.top1) and 0 <= s.top1 <= 100 for s in rows.values())
assert np.isfinite(sweep.top1_GL).all() and sweep.top1_GL.shape == (len(SWEEP_GAMMAS), len(SWEEP_LAMS))
assert abs(rows["zeroshot"].top1 - zeroshot_hooks.top1) < 1e-9, "the runner's zero-shot row is plain CLIP"
write_json_atomic(RUN_DIR / "02_summary.json", summary)
{k: summary[k] for k in ("hooks", "runner", "n_backbone_passes")}'''),
    ]


# ---------------------------------------------------------------------------------- 03
def notebook_03() -> list:
    return [
        md('''\
# 03 · VS2++ and PASS

Two extensions of VS2 from the paper:

- **VS2++** retrieves the N = 50 nearest unlabeled training images of each test image, pseudo-labels
  them with CLIP zero-shot, splits them into S+ (same pseudo-label as the query, or the majority
  pseudo-label) and S- (the rest), and steers with `(gamma - 1) W_dec (mean_{S+} c - mean_{S-} c)`.
  The **oracle** variant splits the neighbours by their *true* labels: it reads labels at test time,
  so it is an upper bound on what better pseudo-labels could give, never a label-free result.
- **PASS** trains the SAE with an extra loss `w_aux * ||z_i - zbar_class(i)||^2` that pulls each
  image's code towards its class's mean code (labels are used in training only), then steers with
  plain VS2.'''),
        code(PARAMETERS + '''
LAM, GAMMA = 2.1, 1.5
FVU_QUANTILE = 0.95
N_NEIGHBOURS = 50  # the paper's N
W_AUX = 0.8  # the paper's weight of the PASS prototype loss''', tags=["parameters"]),
        md(REAL_WEIGHTS_MD),
        code(USE_REAL_WEIGHTS),
        code(SETUP),
        code(CACHE),
        code(TRAIN_SAE),
        md(chance_md()),
        md('''\
## VS2++ with pseudo-labels vs the oracle

The retrieval pool is the activation cache of the training images (its labels are read only by the
oracle rows). The runner builds the pool once (CLIP embeddings, pseudo-labels, SAE code directions),
searches the neighbours once, and scores every method on one backbone pass over the evaluation
images. CLIP-steer (`q + mean_{S+} r - mean_{S-} r` on CLIP embeddings) and weighted RAG are the
paper's retrieval baselines. Rows marked *oracle upper bound* use the test labels.'''),
        code('''\
from sae_lens_vision_steer import ZeroShotClassifier
from sae_lens_vision_steer.evaluation import Evaluator, MethodSpec, format_table
from sae_lens_vision_steer.steering import fvu_threshold_from_reference

classifier = ZeroShotClassifier(model, eval_data.classnames, TEMPLATES, show_progress=SHOW_PROGRESS)
tau = fvu_threshold_from_reference(sae, cache.root, FVU_QUANTILE)
ev = Evaluator(model, eval_data, sae, classifier, batch_size=BATCH_SIZE, num_workers=NUM_WORKERS,
               show_progress=SHOW_PROGRESS, fvu_threshold=tau,
               options={"pool_cache": str(cache.root), "n_neighbours": N_NEIGHBOURS})
settings = {"lam": LAM, "gamma": GAMMA}
methods = ["zeroshot", "vs2", "vs2pp", "vs2pp_majority", "vs2pp_oracle",
           "clip_steer", "clip_steer_oracle", "weighted_rag", "weighted_rag_oracle"]
rows = {name: ev.score(MethodSpec(name, name, settings)) for name in methods}
print(format_table(rows))'''),
        md('''\
How often S+ or S- came out empty; VS2++ then falls back to plain VS2 for that image. Two things
make it common here: random weights give pseudo-labels that collapse onto a few classes (all 50
neighbours agree: empty S-), and a pool of 3,000 images has only 15 per class, so for the oracle
often none of the 50 neighbours shares the query's true class (empty S+). With real CLIP and the
50,000-image CIFAR-100 pool (500 per class) both are much rarer.'''),
        code('''\
for name in ("vs2pp", "vs2pp_majority", "vs2pp_oracle"):
    fb = rows[name].info["empty_set_fallback"]
    print(f"{name:15s} {rows[name].info['rule']}: empty S+ {fb['n_empty_positive']}, empty S- {fb['n_empty_negative']}, "
          f"fallback {fb['fallback_fraction']:.1%} of {fb['n_queries']}")'''),
        code('''\
import matplotlib.pyplot as plt
import numpy as np

fig, ax = plt.subplots(figsize=(7, 3.2))
names = list(rows)
oracle = [bool(rows[n].info.get("oracle_upper_bound")) for n in names]
ax.bar(range(len(names)), [rows[n].top1 for n in names], color=["lightgrey" if o else "tab:blue" for o in oracle],
       edgecolor="black")
ax.set_ylim(0, 1.4 * max(rows[n].top1 for n in names))  # room for the labels
for i, o in enumerate(oracle):
    if o:
        ax.text(i, rows[names[i]].top1, "upper\\nbound", ha="center", va="bottom", fontsize=7)
ax.axhline(rows["zeroshot"].top1, color="black", lw=0.8, ls="--", label="zero-shot")
ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
ax.set_ylabel("top-1 (%)")
ax.set_title(f"{DATASET} {eval_data.split}, {len(ev.labels_N)} images (grey: oracle, uses test labels)", fontsize=9)
ax.legend(fontsize=8, loc="upper right")
fig.tight_layout()
fig.savefig(RUN_DIR / "03_vs2pp.png", dpi=100)
plt.show()'''),
        md('''\
## PASS vs the plain SAE

Train a PASS SAE on the same cache, with the same settings plus the prototype loss, then compare:

- held-out FVU (PASS trades reconstruction for class structure; the paper's FVU rises with w_aux);
- how close the codes lie to their class prototypes (class-mean codes of the training images):
  the mean squared distance `mean ||z - zbar_y||^2`, the total spread `mean ||z - zbar||^2`, and
  their ratio, the *within-class fraction*, which does not change when every code is scaled. An SAE
  can lower the distance by shrinking all its codes; only a lower fraction means tighter classes;
- VS2's top-1 with each SAE, each with its own FVU gate, on the runner's cached tokens.'''),
        code('''\
from sae_lens_vision_steer import accuracy_metrics
from sae_lens_vision_steer.pass_sae import prototype_distance_on_cache, train_pass_sae
from sae_lens_vision_steer.steering import vs2_apply
from sae_lens_vision_steer.training import holdout_split

pass_run = train_pass_sae(cache.root, HOOK, w_aux=W_AUX, k=SAE_K, expansion_factor=SAE_EXPANSION, epochs=SAE_EPOCHS,
                          batch_size=SAE_BATCH, seed=SEED, device=DEVICE, out_dir=RUN_DIR / "sae_pass",
                          resume=True, show_progress=SHOW_PROGRESS)
train_rows, heldout_rows = holdout_split(cache, 0.1, 0)  # the images both trainings held out


@torch.no_grad()
def vs2_top1(sae_, tau_):
    """VS2 with `sae_` on the evaluator's cached CLS tokens, gated at `tau_`: (top-1, coverage)."""
    out = vs2_apply(ev.cached.cls_ND, sae_, LAM, GAMMA, fvu_threshold=tau_)
    logits = classifier.logits(ev.ctx.tokens_to_embeds(out.steered))
    return accuracy_metrics(logits.cpu(), ev.labels_N.cpu()).top1, out.coverage


comparison = {}
for name, (sae_, run_) in {"top-k": (sae, run), "PASS": (pass_run.sae, pass_run)}.items():
    tau_ = fvu_threshold_from_reference(sae_, cache.root, FVU_QUANTILE)
    top1, coverage = vs2_top1(sae_, tau_)
    on_train = prototype_distance_on_cache(sae_, cache.root, train_rows, train_rows, HOOK)
    on_heldout = prototype_distance_on_cache(sae_, cache.root, heldout_rows, train_rows, HOOK)
    comparison[name] = {
        "heldout_fvu": run_.metrics["heldout_fvu"],
        "train_sq_dist": on_train["mean_sq_dist"], "train_spread": on_train["total_sq_dist"],
        "train_within_class": on_train["within_class_fraction"],
        "heldout_within_class": on_heldout["within_class_fraction"],
        "vs2_top1": top1, "vs2_delta_top1": top1 - ev.zeroshot.top1, "vs2_coverage": coverage,
    }
print(f"PASS with w_aux {W_AUX}; distances and fractions of the SAE codes, training images unless marked")
print(f"{'':6s} {'FVU':>6s} {'dist':>7s} {'spread':>7s} {'fraction':>9s} {'(held-out)':>11s} {'VS2 top-1':>10s} {'Δ':>6s}")
for name, c in comparison.items():
    print(f"{name:6s} {c['heldout_fvu']:6.3f} {c['train_sq_dist']:7.3f} {c['train_spread']:7.3f} "
          f"{c['train_within_class']:9.3f} {c['heldout_within_class']:11.3f} {c['vs2_top1']:10.2f} "
          f"{c['vs2_delta_top1']:+6.2f}")
# The top-k VS2 here is the runner's vs2 row, computed again by hand:
assert abs(comparison["top-k"]["vs2_top1"] - rows["vs2"].top1) < 1e-9'''),
        md('''\
What did the prototype loss change? The distance to the prototypes can fall because codes of a class
moved together (the fraction falls) or because every code got smaller (the spread falls as much).
Whether tighter classes carry over to held-out images, and whether they help VS2, depends on the
backbone; with random weights the accuracies say nothing either way.'''),
        code('''\
def change(key):
    return comparison["PASS"][key] / comparison["top-k"][key] - 1


print(f"PASS vs top-k on the training images: distance to prototypes {change('train_sq_dist'):+.0%}, "
      f"total spread {change('train_spread'):+.0%}, within-class fraction {change('train_within_class'):+.1%}; "
      f"held-out within-class fraction {change('heldout_within_class'):+.1%}")'''),
        md('''\
## Summary'''),
        code('''\
import math

from sae_lens_vision_steer.cli.common import write_json_atomic

summary = {
    "use_real_weights": USE_REAL_WEIGHTS, "dataset": DATASET, "n_eval_images": len(ev.labels_N),
    "n_neighbours": N_NEIGHBOURS, "n_backbone_passes": ev.n_backbone_passes,
    "methods": {n: {"top1": s.top1, "delta_top1": s.delta_top1, "coverage": s.coverage,
                    "oracle_upper_bound": bool(s.info.get("oracle_upper_bound")),
                    "fallback_fraction": s.info.get("empty_set_fallback", {}).get("fallback_fraction")}
                for n, s in rows.items()},
    "pass_vs_topk": comparison, "w_aux": W_AUX,
}
assert ev.n_backbone_passes == 1
assert all(math.isfinite(s.top1) for s in rows.values())
assert [n for n, s in rows.items() if s.info.get("oracle_upper_bound")] == \\
    ["vs2pp_oracle", "clip_steer_oracle", "weighted_rag_oracle"]
assert all(math.isfinite(v) for c in comparison.values() for v in c.values())
write_json_atomic(RUN_DIR / "03_summary.json", summary)
summary["pass_vs_topk"]'''),
    ]


# ---------------------------------------------------------------------------------- 04
def notebook_04() -> list:
    return [
        md("""\
# 04 · Interpret CLIP like a HookedTransformer

`HookedCLIP` is a TransformerLens `HookedRootModule` with TL's hook names inside every block
(`ln1.hook_scale`, `attn.hook_q|k|v|z|attn_scores|pattern`, `mlp.hook_pre|post`, the residual
hooks), a `HookedTransformerConfig` as `model.cfg`, and TL's `ActivationCache` from
`run_with_cache`. So TL's own tools work on an image tower. This notebook:

1. draws the CLS token's attention to the patches over the image;
2. ablates attention heads through `hook_z`;
3. splices the SAE in (the `HookedSAETransformer` way) and reads an image's top latents from the cache;
4. runs a logit lens over the blocks with `accumulated_resid` and `apply_ln_to_stack`."""),
        code(PARAMETERS, tags=["parameters"]),
        md(REAL_WEIGHTS_MD),
        code(USE_REAL_WEIGHTS),
        code(SETUP),
        md(chance_md()),
        md("""\
## A TransformerLens cache of an image batch

A batch of evaluation images, and the zero-shot head (class-prompt embeddings) that turns image
embeddings into class logits."""),
        code("""\
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
    print(f"  {name:32s} {tuple(tl_cache[name].shape)}")"""),
        md("""\
## The CLS token's attention to the patches

`hook_pattern` is `[batch, head, query, key]`. Row 0 is what the CLS token attends to; without the
CLS column, reshaped to the patch grid and drawn over the image, it shows where the last block's
CLS looks. (With random weights the maps are unstructured.)"""),
        code("""\
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
print("each CLS row sums to 1:", torch.allclose(pattern[:, :, 0].sum(-1), torch.ones(()), atol=1e-5))"""),
        md("""\
## Head ablation

Zero one head's output `z` (`[batch, pos, head, d_head]`) in the last block and measure how much the
correct-class logit drops, head by head."""),
        code("""\
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
        print(f"block {L} head {h}: correct-class logit {head_effect[h]:+.4f}")"""),
        md("""\
## The SAE spliced in, and an image's top latents

The SAE from notebook 01 (trained here if 01 has not run). `add_sae` splices it at its hook at the
positions it was trained on (the CLS token only), with SAELens' cache keys
(`<hook>.hook_sae_acts_post`, ...). With `use_error_term=True` the model's output is unchanged."""),
        code(CACHE),
        code(TRAIN_SAE),
        code("""\
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
print(f"mean L0 over the batch: {(acts > 0).sum(-1).float().mean():.2f}")"""),
        md("""\
## A logit lens over the blocks

`accumulated_resid` stacks the residual stream (CLS token) before and in the middle of each block;
`apply_ln_to_stack` applies the final LayerNorm's cached scale (TL's `ln_final`, open_clip's
`ln_post`); the projection and the class-prompt directions then give class logits per layer. The
last row is the model's own zero-shot prediction."""),
        code("""\
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
plt.show()"""),
        md("""\
## Summary"""),
        code("""\
from sae_lens_vision_steer.cli.common import write_json_atomic

summary = {
    "use_real_weights": USE_REAL_WEIGHTS, "n_images": N_IMAGES, "clean_top1": clean_top1,
    "head_effect": head_effect, "splice_max_diff": splice_max_diff, "top_latents_image0": latents_top.tolist(),
    "lens_labels": lens_labels, "lens_top1": lens_top1, "lens_final_max_diff": lens_final_max_diff,
}
assert splice_max_diff < 1e-4 and lens_final_max_diff < 1e-3
write_json_atomic(RUN_DIR / "04_summary.json", summary)
summary"""),
    ]


# ---------------------------------------------------------------------------------- building
NOTEBOOKS = {
    "01_train_vision_sae.ipynb": notebook_01,
    "02_vs2_steering.ipynb": notebook_02,
    "03_vs2pp_and_pass.ipynb": notebook_03,
    "04_interpret_like_hooked_transformer.ipynb": notebook_04,
}


def md(source: str):
    return new_markdown_cell(source)


def code(source: str, tags: list[str] | None = None):
    cell = new_code_cell(source)
    if tags:
        cell.metadata["tags"] = tags
    return cell


def build(name: str) -> nbformat.NotebookNode:
    cells = NOTEBOOKS[name]()
    stem = name.split("_")[0]
    for i, cell in enumerate(cells):
        cell.id = f"nb{stem}-{i:02d}"  # fixed ids: the same source gives the same file
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if a notebook is out of date")
    p.add_argument("--out", type=Path, default=NOTEBOOK_DIR, help="folder to write to (default notebooks/)")
    args = p.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        text = render(build(name))
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        print(f"wrote {path}")
    if stale:
        print("out of date (run python scripts/build_notebooks.py):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
