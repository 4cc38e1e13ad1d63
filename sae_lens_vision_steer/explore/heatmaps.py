"""Patch heatmaps for a latent's top images: `[n_patches]` per (image, latent), row-major over the grid.

- `sae` (SAEs trained on patch or all tokens): the latent's activation on each patch token, read from
  the cache's patch rows and encoded by the SAE. Exact; latent-specific.
- `attention` (the default for a CLS-only SAE): the CLS token's attention to each patch in the SAE's
  block (`blocks.{L}.attn.hook_pattern`, query 0, averaged over heads), from `model.run_with_cache`.
  It shows where the CLS token read from in that block; it is the same for every latent of an image.
- `gradient` (the default for a CLS-only SAE; latent-specific): gradient x input at the patch
  embeddings (`hook_patch_embed`, before the position embedding and `ln_pre`):
  `sum_d (e_pd - z_d) * d a_s / d e_pd`, clipped at zero, where `a_s` is the latent on the image's
  CLS row and `z` the embedding of a blanked patch (0 for CLIP, whose patch projection has no bias).
  This is the first-order Taylor estimate of the occlusion map, for one forward pass (to the SAE's
  block) and one backward pass per (image, latent) pair instead of `1 + n_patches` forwards.
  (Not at the residual stream: a pre-LN block reads each token through a LayerNorm, which is blind
  to the token's scale, so gradient x input there is zero.)
- `occlusion` (CLS-only SAE, latent-specific): the drop of the latent's activation when one patch is
  replaced by the normalised data mean (zero after the model's normalisation), patch by patch, clipped
  at zero. Costs `1 + n_patches` partial forward passes per image (to the SAE's block only).
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np
import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from ..activation_cache import ActivationStore
from ..core.errors import UsageError
from ..core.positions import POOLED_HOOKS
from ..sae.splice import HookedCLIP

METHODS = ("attention", "gradient", "occlusion", "sae")


def hook_block(model: HookedCLIP, hook_name: str) -> int:
    """The block whose output the hook reads (`blocks.L.*` -> L; head hooks -> the last block)."""
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    if m:
        return int(m.group(1))
    if hook_name == "hook_embed":
        return 0
    return model.cfg.n_layers - 1


def grid_shape(model: HookedCLIP) -> tuple[int, int]:
    size = model.cfg.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return h // model.cfg.patch_size, w // model.cfg.patch_size


@torch.no_grad()
def attention_maps(model: HookedCLIP, images_BCHW: torch.Tensor, hook_name: str, batch_size: int = 128) -> np.ndarray:
    """`[B, n_patches]` CLS-to-patch attention in the SAE's block, averaged over heads."""
    L = hook_block(model, hook_name)
    name = f"blocks.{L}.attn.hook_pattern"
    out = []
    for i in range(0, len(images_BCHW), batch_size):
        _, tl_cache = model.run_with_cache(images_BCHW[i:i + batch_size].to(model.device), names_filter=[name],
                                           stop_at_layer=L + 1)
        n_patches = grid_shape(model)[0] * grid_shape(model)[1]  # the last tokens (after CLS and any registers)
        out.append(tl_cache[name][:, :, 0, -n_patches:].mean(dim=1).float().cpu())
    return torch.cat(out).numpy()


def _token_rows(model: HookedCLIP, images_BCHW: torch.Tensor, hook_name: str) -> torch.Tensor:
    """The CLS row at the hook, `[B, d_in]`."""
    if hook_name in POOLED_HOOKS:
        _, c = model.run_with_cache(images_BCHW, names_filter=[hook_name])
        return c[hook_name]
    L = hook_block(model, hook_name)
    _, c = model.run_with_cache(images_BCHW, names_filter=[hook_name], stop_at_layer=L + 1)
    return c[hook_name][:, 0]


@torch.no_grad()
def occlusion_maps(model: HookedCLIP, sae: SAE, images_BCHW: torch.Tensor, latents: list[list[int]],
                   hook_name: str, show_progress: bool = True) -> list[np.ndarray]:
    """Per image `b`, `[len(latents[b]), n_patches]`: activation drop when each patch is blanked."""
    gh, gw = grid_shape(model)
    p = model.cfg.patch_size
    out = []
    for b in tqdm(range(len(images_BCHW)), desc="occlusion heatmaps", unit="img", disable=not show_progress):
        x = images_BCHW[b].to(model.device)
        batch = x.expand(1 + gh * gw, *x.shape).clone()
        for k in range(gh * gw):
            r, c = divmod(k, gw)
            batch[1 + k, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = 0.0
        codes = sae.encode(_token_rows(model, batch, hook_name).to(sae.W_enc.dtype))[:, latents[b]].float()
        out.append((codes[0:1] - codes[1:]).clamp(min=0).T.cpu().numpy())
    return out


@torch.no_grad()
def sae_patch_maps(cache: ActivationStore, sae: SAE, hook_name: str, images: Iterable[int],
                   latents: list[list[int]]) -> list[np.ndarray]:
    """For a patch/all-token cache: per image, `[len(latents[b]), n_patches]` SAE activations per patch."""
    P = int(cache.metadata["request"]["rows_per_image"])
    skip = 1 if cache.positions == "all" else 0  # row 0 of an image is its CLS token
    images = list(images)
    rows = np.concatenate([np.arange(i * P + skip, (i + 1) * P) for i in images]) if images else np.zeros(0, np.int64)
    acts = cache.load(hook_name, rows).to(sae.W_enc.device, sae.W_enc.dtype)
    codes = sae.encode(acts).float().cpu().reshape(len(images), P - skip, -1)
    return [codes[b][:, latents[b]].T.numpy() for b in range(len(images))]


def check_gradient_hook(hook_name: str) -> None:
    """Refuse hooks where the CLS row does not depend on the patches yet (its gradient would be zero)."""
    if hook_name in ("hook_embed", "hook_patch_embed", "blocks.0.hook_resid_pre"):
        raise UsageError(f"heatmap 'gradient' needs a hook after the first attention layer; at {hook_name} the "
                         "CLS token does not depend on the patches yet")


def gradient_maps(model: HookedCLIP, sae: SAE, images_BCHW: torch.Tensor, latents: list[list[int]],
                  hook_name: str, batch_size: int = 64) -> list[np.ndarray]:
    """Per image `b`, `[len(latents[b]), n_patches]`: gradient x input of each latent at the patch
    embeddings, clipped at zero: the first-order approximation of the occlusion map (see the module
    docstring). One forward pass (to the SAE's block) and one backward pass per (image, latent)."""
    check_gradient_hook(hook_name)
    pooled = hook_name in POOLED_HOOKS
    stop = None if pooled else hook_block(model, hook_name) + 1
    pairs = [(b, j, s) for b, lats in enumerate(latents) for j, s in enumerate(lats)]
    out = [np.zeros((len(lats), grid_shape(model)[0] * grid_shape(model)[1]), dtype=np.float32) for lats in latents]
    if not pairs:
        return out
    with torch.no_grad():  # a blanked patch's embedding: 0 for CLIP, the projection's bias for timm / DINOv2
        _, c = model.run_with_cache(torch.zeros_like(images_BCHW[:1]).to(model.device),
                                    names_filter=["hook_patch_embed"], stop_at_layer=0)
        blank = c["hook_patch_embed"]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        images = images_BCHW[torch.tensor([b for b, _, _ in chunk])].to(model.device)
        lat = torch.tensor([s for _, _, s in chunk], device=sae.W_enc.device)
        kept: dict[str, torch.Tensor] = {}

        def leaf(act, hook):  # differentiate with respect to the patch embeddings only
            kept["x"] = act.detach().requires_grad_(True)
            return kept["x"]

        def read(act, hook):
            kept["row"] = act if pooled else act[:, 0]

        with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_patch_embed", leaf), (hook_name, read)]):
            model(images, stop_at_layer=stop)
            codes = sae.encode(kept["row"].to(sae.W_enc.dtype))
            a = codes[torch.arange(len(chunk), device=codes.device), lat]
            (g,) = torch.autograd.grad(a.sum(), kept["x"])
        contrib = (g * (kept["x"] - blank)).sum(-1).clamp(min=0).float().detach().cpu().numpy()
        for (b, j, _), row in zip(chunk, contrib):
            out[b][j] = row
    return out
