"""`HookedViT`: a ViT image tower (open_clip, timm or transformers; see `registry.py`) as a
TransformerLens `HookedRootModule`.

The tower is re-run through its own submodules (no weight copies) with TL's hook names and shapes:

    hook_patch_embed [B, P, D]   conv patch embeddings
    ln_pre.hook_scale / hook_normalized
    hook_embed [B, T, D]         class + patch + position embedding after ln_pre: the residual stream's
                                 start, so TL's `decompose_resid` sums to the residual stream
    blocks.{i}.                  hook_resid_pre, ln1.*, attn.hook_q|k|v|z|attn_scores|pattern|result,
                                 hook_attn_out, hook_resid_mid, ln2.*, mlp.hook_pre|post, hook_mlp_out,
                                 hook_resid_post
    ln_final.hook_scale / hook_normalized [B, T, 1] / [B, T, D]   the final norm (open_clip's `ln_post`)
    hook_ln_post [B, D]          CLS families: the pooled CLS token after the final norm
    hook_pooled [B, D]           families without a CLS token: the attention-pool output (SigLIP) or the
                                 mean of the patch tokens
    hook_image_embed [B, E]      after the projection, before normalisation

`run_with_cache` returns a TL `ActivationCache`; `cfg` is a `HookedTransformerConfig`. `set_precision("bf16")`
(or `"fp16"`) runs the tower under `torch.autocast` (hooks see low-precision activations; what `forward`,
`run_blocks` and `head` return is cast back to the weights' dtype); the text tower keeps its dtype. SAEs are
spliced in by `sae.splice.HookedCLIP`, the subclass users load (`HookedSAETransformer`'s split: this
module knows nothing of SAEs).
"""

from __future__ import annotations

import difflib
import functools
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from ..core.errors import UnknownNameError, UsageError
from ..core.positions import POOLED_HOOKS
from ..core.precision import autocast, check_precision
from . import registry
from .components import MLP, Attention, LayerNorm, TransformerBlock
from .config import HookedCLIPConfig
from .kwargs import architecture_kwargs, check_user_model_kwargs
from .tower import Tower


def _in_precision(fn: Callable) -> Callable:
    """Run a tower method under the model's autocast (once: nested calls run inside the outer one) and give
    back the weights' dtype."""

    @functools.wraps(fn)
    def wrapper(self: "HookedViT", *args: Any, **kwargs: Any) -> Any:
        device_type = self.device.type
        if self.precision == "fp32" or torch.is_autocast_enabled(device_type):
            return fn(self, *args, **kwargs)
        with autocast(self.precision, device_type):
            out = fn(self, *args, **kwargs)
        return out.to(self.cfg.dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    return wrapper


BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


class HookedViT(HookedRootModule):
    """A hooked image tower (see the module docstring for the hook names). Users load `HookedCLIP`, this
    class with the SAE splice API."""

    def __init__(
        self,
        model: nn.Module,
        model_name: str = "custom",
        pretrained: str | None = None,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        tokenizer: Callable[..., torch.Tensor] | None = None,
        use_attn_result: bool = False,
        model_kwargs: dict | None = None,
    ):
        """Wrap a library model of any registered family (see `registry.describe()`)."""
        super().__init__()
        tower = registry.tower_for(model, model_name=model_name, preprocess=preprocess, tokenizer=tokenizer)
        self._tower = tower
        self.clip = tower.library_model.eval()
        self.cfg = _config(tower, model_name, pretrained, use_attn_result, model_kwargs)
        self.preprocess = tower.preprocess
        self.tokenizer = tower.tokenizer
        self.hook_patch_embed = HookPoint()
        self.ln_pre = LayerNorm(tower.ln_pre) if tower.ln_pre is not None else None
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(
            TransformerBlock(p.ln1, Attention(self.cfg, **p.attn), p.ln2, MLP(p.fc1, p.act, p.fc2), p.ls1, p.ls2)
            for p in tower.blocks)
        self.ln_final = LayerNorm(tower.ln_final) if tower.ln_final is not None else None
        pooled = "hook_ln_post" if tower.pooling == "cls" else "hook_pooled"
        setattr(self, pooled, HookPoint())
        self._pooled = getattr(self, pooled)
        self.hook_image_embed = HookPoint()
        self.precision = "fp32"
        self.init_hooks()
        self.setup()

    def set_precision(self, precision: str) -> "HookedViT":
        """`fp32` (default), `bf16` or `fp16`: autocast for the tower's forward passes (see the module
        docstring). `core.precision.resolve_precision` says what a device supports."""
        self.precision = check_precision(precision)
        return self

    @classmethod
    def from_pretrained(
        cls, model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
        use_attn_result: bool = False, **kwargs: Any,
    ) -> "HookedViT":
        """Load by name: open_clip names and tags (`ViT-B-32`, `openai`), `hf-hub:` and `local-dir:` names,
        transformers repo ids as `hf:openai/clip-vit-base-patch32`, timm names as `timm:vit_base_patch14_dinov2`.
        Unsupported towers are refused from their config, before any weights are downloaded.

        When an open_clip tag's weights were trained with QuickGELU (OpenAI's, LAION-400M's, ...), the
        network is built with QuickGELU even if the name lacks `-quickgelu`, so that `ViT-B-32` +
        `openai` is the same network as `ViT-B-32-quickgelu` + `openai`.
        """
        check_user_model_kwargs(kwargs)  # a loading-safety switch set here is the caller's explicit choice: warned
        model, preprocess, tokenizer = registry.load(model_name, pretrained, device, **kwargs)
        arch_kwargs = architecture_kwargs(kwargs)  # loading switches are this call's choice, never recorded
        return cls(model, model_name=model_name, pretrained=pretrained, preprocess=preprocess, tokenizer=tokenizer,
                   use_attn_result=use_attn_result, model_kwargs=arch_kwargs)

    def init_hooks(self) -> None:
        """Called before `setup()`; subclasses add state that the hook points need."""

    @property
    def pooled_hook(self) -> str:
        """The pooled-token hook: `hook_ln_post` (CLS families) or `hook_pooled`."""
        return "hook_ln_post" if self.cfg.pooling == "cls" else "hook_pooled"

    @property
    def steer_hook(self) -> str:
        """Where the paper's SAEs and VS2 sit by default ("the final CLS token"): the CLS token of the final
        block for CLS families, the pooled token (`hook_pooled`) for families without one."""
        return f"blocks.{self.cfg.n_layers - 1}.hook_resid_post" if self.cfg.pooling == "cls" else "hook_pooled"

    @property
    def has_text(self) -> bool:
        return self._tower.has_text

    # ------------------------------------------------------------------ hook names
    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def check_hook_name(self, name: str) -> None:
        if name not in self.hook_dict:
            close = difflib.get_close_matches(name, self.hook_names, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise UnknownNameError(f"unknown hook name {name!r}.{hint} Valid hook names: {self.hook_names}")

    def hook_width(self, name: str) -> int:
        """Last-dimension size of the activations at a hook."""
        self.check_hook_name(name)
        cfg, leaf = self.cfg, name.rsplit(".", 1)[-1]
        if name == "hook_image_embed":
            return cfg.embed_dim
        if ".mlp." in name:
            return cfg.d_mlp
        if leaf == "hook_scale":
            return 1
        if leaf in ("hook_attn_scores", "hook_pattern"):
            return cfg.n_tokens
        if leaf in ("hook_q", "hook_k", "hook_v", "hook_z"):
            return cfg.d_head
        if leaf.startswith("hook_sae_"):
            return self.sae_hook_width(name)
        return cfg.d_model

    def hook_layer(self, name: str) -> int:
        """Index of the block a hook belongs to (-1 before the first block, n_layers after the last)."""
        self.check_hook_name(name)
        if name.startswith("blocks."):
            return int(name.split(".")[1])
        return -1 if name in ("hook_patch_embed", "hook_embed") or name.startswith("ln_pre.") else self.cfg.n_layers

    def add_hook(self, name: Any, hook: Callable, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if isinstance(name, str):
            self.check_hook_name(name)
        super().add_hook(name, hook, *args, **kwargs)

    def _enable_hook(self, name: Any, hook: Callable, dir: Any) -> None:  # used by hooks()/run_with_hooks
        if isinstance(name, str):
            self.check_hook_name(name)
        super()._enable_hook(name, hook, dir)

    # ------------------------------------------------------------------ TL caches
    def get_caching_hooks(self, names_filter=None, incl_bwd=False, device=None, remove_batch_dim=False,
                          cache=None, pos_slice=None):
        # TL's caching hooks slice dimension -2 of every tensor with pos_slice and, with remove_batch_dim,
        # slice the already un-batched tensor. The pooled hooks have no position dimension (TL would
        # slice their batch, or crash), so they get their own save hook here.
        keep = _as_filter(names_filter)
        cache, fwd, bwd = super().get_caching_hooks(
            lambda n: keep(n) and n not in POOLED_HOOKS, incl_bwd, device, remove_batch_dim, cache, pos_slice)

        def save_pooled(tensor: torch.Tensor, hook: HookPoint, is_backward: bool = False) -> None:
            t = tensor.detach().to(device)
            cache[hook.name + ("_grad" if is_backward else "")] = t[0] if remove_batch_dim else t

        for name in POOLED_HOOKS:
            if name in self.hook_dict and keep(name):
                fwd.append((name, save_pooled))
                if incl_bwd:
                    bwd.append((name, partial(save_pooled, is_backward=True)))
        return cache, fwd, bwd

    def run_with_cache(self, *model_args: Any, names_filter: Any = None, device: Any = None,
                       remove_batch_dim: bool = False, incl_bwd: bool = False, reset_hooks_end: bool = True,
                       clear_contexts: bool = False, pos_slice: Any = None, return_cache_object: bool = True,
                       backward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, **model_kwargs: Any):
        """As `HookedTransformer.run_with_cache`: `(output, ActivationCache)`, same arguments.

        `incl_bwd=True` back-propagates from the output, which must then be a scalar, as in TL; since an
        image tower returns embeddings, `backward_fn(output) -> scalar` may name the quantity instead
        (e.g. one class logit). Gradients are cached as `<hook>_grad`.
        """
        # TL's HookedRootModule.run_with_cache, plus backward_fn.
        cache_dict, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device,
                                                      remove_batch_dim=remove_batch_dim, pos_slice=pos_slice)
        with self.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset_hooks_end,
                        clear_contexts=clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                loss = backward_fn(out) if backward_fn is not None else out
                if loss.numel() != 1:
                    raise UsageError(f"incl_bwd=True needs a scalar to back-propagate; the output has shape "
                                     f"{tuple(loss.shape)}: pass backward_fn=lambda embed: <scalar>")
                loss.backward()
        if not return_cache_object:
            return out, cache_dict
        return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    # ------------------------------------------------------------------ forward passes
    @property
    def visual(self) -> nn.Module:
        """open_clip's image tower (`model.clip.visual`), for open_clip families."""
        return self.clip.visual

    def to(self, *args: Any, **kwargs: Any) -> "HookedViT":  # keep cfg.device/dtype true, as TL does
        out = super().to(*args, **kwargs)
        self.cfg.device = str(self.device)
        self.cfg.dtype = next(self.clip.parameters()).dtype
        return out

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images -> the residual stream's start `[B, T, D]`."""
        t = self._tower
        x = t.add_tokens(self.hook_patch_embed(t.patch_embed(images_BCHW)), images_BCHW)
        return self.hook_embed(self.ln_pre(x) if self.ln_pre is not None else x)

    @_in_precision
    def run_blocks(self, resid_BTD: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks `start .. stop-1` on the residual stream."""
        for block in self.blocks[start:stop]:
            resid_BTD = block(resid_BTD)
        return resid_BTD

    @_in_precision
    def head(self, final_resid: torch.Tensor) -> torch.Tensor:
        """Final norm, pooling and projection: the tower after the last block.

        Accepts the full final residual stream `[B, T, D]` or one vector per image `[B, D]`: for CLS
        families the final block's CLS token (the final norm acts per token, so both give the same
        embedding); for the others the pooled token (`hook_pooled`), which only the projection follows.
        """
        if final_resid.ndim == 2 and self.cfg.pooling != "cls":
            return self.head_from_pooled(self._pooled(final_resid))
        normed = self.ln_final(final_resid) if self.ln_final is not None else final_resid
        if normed.ndim == 2:
            pooled_BD = normed
        else:
            pooled_BD = self._tower.pool(normed)
        return self.head_from_pooled(self._pooled(pooled_BD))

    def head_unhooked(self, x: torch.Tensor) -> torch.Tensor:
        """`head` through the library's own modules, firing no hook point (for precomputing embeddings
        while steering hooks are attached)."""
        t = self._tower
        if x.ndim == 2 and self.cfg.pooling != "cls":
            return t.project(x)
        normed = t.ln_final(x) if t.ln_final is not None else x
        return t.project(normed if normed.ndim == 2 else t.pool(normed))

    def vision_state_dict(self) -> dict[str, torch.Tensor]:
        """The image tower's weights (for fingerprints): open_clip's `visual`, transformers' vision model
        and projection, or the whole timm/DINOv2 backbone."""
        return {f"{i}.{k}": v for i, m in enumerate(self._tower.vision_modules) for k, v in m.state_dict().items()}

    # ------------------------------------------------------------------ TL utilities
    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """TL's `HookedTransformer.accumulated_bias`: the sum of the attention output biases `b_O` (and, with
        `include_mlp_biases`, the MLP output biases `b_out`) of blocks `0..layer-1`, plus block `layer`'s `b_O`
        with `mlp_input`, each through the block's layer scale when it has one. With the cache's `embed`
        (our `hook_embed`, the residual stream's start), the heads' and the neurons' outputs it sums to the
        residual stream, so `cache.get_full_resid_decomposition()` works."""
        bias = torch.zeros(self.cfg.d_model, device=self.device, dtype=self.cfg.dtype)
        for i in range(layer):
            block = self.blocks[i]
            bias = bias + block.scale_attn(block.attn.b_O)
            if include_mlp_biases:
                bias = bias + block.scale_mlp(block.mlp.b_out)
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise UsageError(f"mlp_input=True needs layer < n_layers ({self.cfg.n_layers}), got {layer}")
            bias = bias + self.blocks[layer].scale_attn(self.blocks[layer].attn.b_O)
        return bias

    def class_residual_directions(self, class_embeds_CE: torch.Tensor) -> torch.Tensor:
        """The residual-stream direction `[C, D]` of each class-prompt embedding (`[C, embed_dim]`, e.g. a
        `ZeroShotClassifier`'s normalised class embeddings): `ln_final.w * (W_proj @ e_c)`, the map from the
        final CLS token after the final norm's scaling to the class logit (before the image embedding's
        normalisation and `logit_scale`, which scale all of an image's logits alike). Set them as
        `model.class_directions` and `cache.logit_attrs(stack, tokens=class_indices, pos_slice=0)` gives each
        component's share of each image's class logit (TL's `tokens_to_residual_directions` reads them)."""
        if self.cfg.pooling != "cls":
            raise UsageError(f"class directions need a CLS-pooled tower; {self.cfg.model_name} pools with "
                             f"{self.cfg.pooling!r}")
        self._text()  # image-only backbones have no class prompts
        basis = torch.eye(self.cfg.d_model, device=self.device, dtype=self.cfg.dtype)
        zero = torch.zeros(1, self.cfg.d_model, device=self.device, dtype=self.cfg.dtype)
        proj_DE = self._tower.project(basis) - self._tower.project(zero)  # the linear part of the projection
        dirs = class_embeds_CE.to(proj_DE) @ proj_DE.T
        return dirs * self.ln_final.w if self.ln_final is not None else dirs

    def tokens_to_residual_directions(self, tokens: Any) -> torch.Tensor:
        """TL's name, for `cache.logit_attrs`: the rows of `model.class_directions` (see
        `class_residual_directions`) for class indices `tokens` (an int or an int tensor of any shape)."""
        dirs = getattr(self, "class_directions", None)
        if dirs is None:
            raise UsageError("set model.class_directions = model.class_residual_directions(class_embeds) first: "
                             "an image tower has no vocabulary, its 'tokens' are class indices")
        return dirs[torch.as_tensor(tokens, device=dirs.device)]

    def head_from_pooled(self, pooled_BD: torch.Tensor) -> torch.Tensor:
        """The projection after the pooled token (`hook_ln_post` / `hook_pooled`)."""
        return self.hook_image_embed(self._tower.project(pooled_BD))

    @_in_precision
    def forward(self, images_BCHW: torch.Tensor, stop_at_layer: int | None = None) -> torch.Tensor:
        """Image embeddings `[B, embed_dim]` (unnormalised, as `open_clip.encode_image`).

        With `stop_at_layer=n`, runs blocks `0..n-1` only and returns the residual stream
        `[B, T, D]` (TransformerLens semantics), so caching an early block skips the later ones.
        """
        resid = self.embed(images_BCHW)
        if stop_at_layer is not None:
            return self.run_blocks(resid, 0, stop_at_layer)
        return self.head(self.run_blocks(resid))

    def encode_image(self, images_BCHW: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        embed = self(images_BCHW)
        return nn.functional.normalize(embed, dim=-1) if normalize else embed

    def library_encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """The library's own image embedding, no hooks (open_clip `encode_image`, transformers
        `get_image_features`, timm's forward): the reference `encode_image` equals."""
        return self._tower.library_forward(images_BCHW)

    def _text(self):
        if not self._tower.has_text:
            raise UsageError(f"{self.cfg.model_name} ({self._tower.family}) is an image-only backbone: it has no text "
                             "tower, so zero-shot classification and text prompts are not available")
        return self._tower

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self._text().encode_text(tokens)
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._text().tokenizer(texts).to(self.device)

    @property
    def logit_scale(self) -> float:
        return self._text().logit_scale()


def _config(tower: Tower, model_name: str, pretrained: str | None, use_attn_result: bool,
            model_kwargs: dict | None) -> HookedCLIPConfig:
    first = tower.blocks[0]
    d_model = first.fc1.weight.shape[1]
    param = next(tower.library_model.parameters())
    return HookedCLIPConfig.build(
        act_fn=tower.act_fn, model_name=model_name, pretrained=pretrained, n_layers=len(tower.blocks),
        d_model=d_model, n_heads=first.attn["n_heads"], d_head=first.attn["d_head"], d_mlp=first.fc1.weight.shape[0],
        n_ctx=tower.n_tokens, d_vocab=-1, eps=first.ln1.eps, normalization_type="LN",
        positional_embedding_type="standard", attention_dir="bidirectional", post_embedding_ln=tower.ln_pre is not None,
        original_architecture=f"{tower.family}.{type(tower.library_model).__name__}", use_attn_result=use_attn_result,
        device=str(param.device), dtype=param.dtype, embed_dim=tower.embed_dim, n_tokens=tower.n_tokens,
        image_size=tower.image_size, patch_size=tower.patch_size, model_kwargs=model_kwargs or None,
        family=tower.family, pooling=tower.pooling, n_prefix_tokens=tower.n_prefix_tokens,
        has_cls_token=tower.has_cls_token,
    )


def _as_filter(names_filter: Any) -> Callable[[str], bool]:
    """TL's `names_filter` forms (None, a name, a list of names, a predicate) as a predicate."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if isinstance(names_filter, (list, tuple, set)):
        allowed = set(names_filter)
        return lambda name: name in allowed
    if callable(names_filter):
        return names_filter
    raise UsageError("names_filter must be a string, a list of strings, or a function")
