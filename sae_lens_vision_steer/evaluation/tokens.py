"""The evaluation set's tokens at one hook, from one backbone pass (sharded across ranks under
torchrun), and the rest of the tower from there (`make_tower_tail`)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core import distributed
from ..core.errors import UsageError
from ..data import shard_loader
from ..data.base import ImageDataset
from ..sae.splice import HookedCLIP

RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
EMBED_HOOK = "hook_image_embed"  # after the projection, before normalisation: the other reading of VS2's site
VECTOR_HOOKS = ("hook_pooled", EMBED_HOOK)  # one vector per image


@dataclass
class HookTokens:
    """The evaluation set's tokens at one residual hook, and how to finish the tower from there."""

    hook_name: str
    cls_ND: torch.Tensor  # CLS tokens at the hook (model device)
    labels_N: torch.Tensor
    n_skipped: int
    seconds: float
    resid_NTD: torch.Tensor | None = None  # all tokens (CPU), only when blocks remain after the hook
    start_block: int = 0  # first block still to run after the hook


def hook_cut(model: HookedCLIP, hook_name: str) -> tuple[int, int]:
    """`(stop_at_layer, start_block)` for a residual hook: the forward that ends at the hook, and the
    first block the rest of the tower has to run."""
    model.check_hook_name(hook_name)
    if hook_name in VECTOR_HOOKS:  # one vector per image, after every block
        return model.cfg.n_layers, model.cfg.n_layers
    m = RESID_HOOK.match(hook_name)
    if not m:
        raise UsageError(f"the evaluation runner caches residual-stream hooks (blocks.i.hook_resid_pre/post); "
                         f"got {hook_name!r}")
    i = int(m.group(1))
    cut = i + 1 if m.group(2) == "post" else i
    return cut, cut


@torch.no_grad()
def cache_hook_tokens(model: HookedCLIP, data: ImageDataset | DataLoader, hook_name: str, batch_size: int = 256,
                      num_workers: int = 2, show_progress: bool = True) -> HookTokens:
    """One backbone pass up to `hook_name` (a residual hook), keeping the evaluation set's tokens there.

    For the final block only the CLS tokens are kept (the rest of the tower is `model.head`); for an
    earlier hook all tokens are kept on the CPU, since later blocks mix them.
    """
    stop, start = hook_cut(model, hook_name)
    keep_all = start < model.cfg.n_layers
    # Under torchrun each rank runs its block of the batch grid; the tokens are gathered in order below.
    on_cuda = model.device.type == "cuda"  # page-locked batches, copied without blocking
    loader = data if isinstance(data, DataLoader) else shard_loader(data, batch_size, num_workers, on_cuda)
    cls, resid, labels, n_skipped = [], [], [], 0
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc=f"backbone to {hook_name}", disable=not show_progress, unit="batch"):
        n_skipped += batch.n_skipped
        if len(batch.labels) == 0:
            continue
        if hook_name in VECTOR_HOOKS:
            _, acts = model.run_with_cache(batch.images.to(model.device, non_blocking=on_cuda), names_filter=[hook_name],
                                           return_cache_object=False)
            cls.append(acts[hook_name].to(model.cfg.dtype))  # (autocast: low precision inside the hook)
            labels.append(batch.labels)
            continue
        tokens_BTD = model(batch.images.to(model.device, non_blocking=on_cuda), stop_at_layer=stop)
        cls.append(tokens_BTD[:, 0].clone())
        if keep_all:
            resid.append(tokens_BTD.cpu())
        labels.append(batch.labels)
    if distributed.active() and not isinstance(data, DataLoader):
        cls_, labels_, resid_ = distributed.gather_cat([torch.cat(cls) if cls else None,
                                                        torch.cat(labels) if labels else None,
                                                        torch.cat(resid) if resid else None])
        cls, labels, resid = ([t] if t is not None else [] for t in (cls_, labels_, resid_))
        cls = [c.to(model.device) for c in cls]
        n_skipped = distributed.sum_int(n_skipped)
    if not cls:
        raise UsageError("no images were evaluated (the data set is empty or every image was unreadable)")
    return HookTokens(hook_name, torch.cat(cls), torch.cat(labels), n_skipped, time.perf_counter() - t0,
                      torch.cat(resid) if keep_all else None, start)


def make_tower_tail(model: HookedCLIP, cached: HookTokens, batch_size: int = 256) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping CLS tokens at the hook `[N, D]` to image embeddings `[N, E]`."""

    @torch.no_grad()
    def tail(cls_ND: torch.Tensor) -> torch.Tensor:
        if len(cls_ND) != len(cached.cls_ND):
            raise UsageError(f"expected {len(cached.cls_ND)} tokens (one per cached image), got {len(cls_ND)}")
        out = []
        # Blocks after the hook are backbone work: under torchrun each rank runs its block of the batch grid.
        split = cached.resid_NTD is not None and distributed.active()
        starts = [b[0] for b in distributed.batch_block(len(cls_ND), batch_size)] if split else \
            range(0, len(cls_ND), batch_size)
        for i in starts:
            c = cls_ND[i:i + batch_size].to(model.device, model.cfg.dtype)
            if cached.hook_name == EMBED_HOOK:  # the image embedding itself: nothing left of the tower
                out.append(c)
            elif cached.resid_NTD is None:
                out.append(model.head(c))
            else:
                r = cached.resid_NTD[i:i + batch_size].to(model.device).clone()
                r[:, 0] = c
                out.append(model.head(model.run_blocks(r, cached.start_block)))
        if split:
            return distributed.gather_cat([torch.cat(out) if out else None], model.device)[0]
        return torch.cat(out)

    return tail
