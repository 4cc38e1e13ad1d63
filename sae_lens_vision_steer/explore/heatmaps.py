"""Patch heatmaps for a latent's top images: `[n_patches]` per (image, latent), row-major over the grid.

- `sae` (SAEs trained on patch or all tokens): the latent's activation on each patch token, read from
  the cache's patch rows and encoded by the SAE. Exact; latent-specific.
- `attention` (the default for a CLS-only SAE): the CLS token's attention to each patch in the SAE's
  block (`blocks.{L}.attn.hook_pattern`, query 0, averaged over heads), from `model.run_with_cache`.
  It shows where the CLS token read from in that block; it is the same for every latent of an image.
- `gradient` (the default for a CLS-only SAE; latent-specific): gradient x input at the patch tokens
  where they enter the SAE's block (`blocks.{L}.hook_resid_pre`): `sum_d x_pd * d a_s / d x_pd`, the
  first-order contribution of patch token `p` to the latent's activation `a_s` on the image's CLS
  row, clipped at zero. One forward pass through block L (from a stored `resid_pre`) and one backward
  pass per (image, latent) pair; the earlier blocks run once per image, without gradients.
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
        out.append(tl_cache[name][:, :, 0, 1:].mean(dim=1).float().cpu())
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


def gradient_source_block(model: HookedCLIP, hook_name: str) -> int:
    """The block at whose input the gradient heatmap reads the patch tokens: the block the hook is in
    (`blocks.L.hook_resid_pre` is block L-1's output, so L-1); the last block for pooled hooks."""
    if hook_name == "hook_embed":
        raise UsageError("heatmap 'gradient' needs a hook after the first block; at hook_embed the CLS token "
                         "does not depend on the patches yet")
    L = hook_block(model, hook_name)
    if re.fullmatch(r"blocks\.\d+\.hook_resid_pre", hook_name):
        if L == 0:
            raise UsageError("heatmap 'gradient' needs a hook after the first block; at blocks.0.hook_resid_pre "
                             "the CLS token does not depend on the patches yet")
        return L - 1
    return L


def gradient_maps(model: HookedCLIP, sae: SAE, images_BCHW: torch.Tensor, latents: list[list[int]],
                  hook_name: str, batch_size: int = 64) -> list[np.ndarray]:
    """Per image `b`, `[len(latents[b]), n_patches]`: gradient x input of each latent at the patch tokens
    entering the SAE's block, clipped at zero (see the module docstring)."""
    gh, gw = grid_shape(model)
    n_patches = gh * gw
    L = gradient_source_block(model, hook_name)
    pooled = hook_name in POOLED_HOOKS
    stop = None if pooled else hook_block(model, hook_name) + 1
    with torch.no_grad():  # the residual stream entering block L: once per image, no graph
        parts = []
        for i in range(0, len(images_BCHW), batch_size):
            x = images_BCHW[i:i + batch_size].to(model.device)
            parts.append(model(x, stop_at_layer=L) if L > 0 else model.embed(x))
        resid = torch.cat(parts) if parts else None
    pairs = [(b, j, s) for b, lats in enumerate(latents) for j, s in enumerate(lats)]
    out = [np.zeros((len(lats), n_patches), dtype=np.float32) for lats in latents]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        x = resid[torch.tensor([b for b, _, _ in chunk], device=resid.device)].detach().requires_grad_(True)
        lat = torch.tensor([s for _, _, s in chunk], device=sae.W_enc.device)
        kept: dict[str, torch.Tensor] = {}

        def read(act, hook):
            kept["row"] = act if pooled else act[:, 0]

        with torch.enable_grad(), model.hooks(fwd_hooks=[(hook_name, read)]):
            final = model.run_blocks(x, L, stop)
            if pooled:
                model.head(final)
            codes = sae.encode(kept["row"].to(sae.W_enc.dtype))
            a = codes[torch.arange(len(chunk), device=codes.device), lat]
            (g,) = torch.autograd.grad(a.sum(), x)
        contrib = (g * x).sum(-1)[:, -n_patches:].clamp(min=0).float().detach().cpu().numpy()
        for (b, j, _), row in zip(chunk, contrib):
            out[b][j] = row
    return out
