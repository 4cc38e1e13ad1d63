"""`HookedCLIP`: an open_clip CLIP image tower as a TransformerLens `HookedRootModule`.

The tower is re-run through its own submodules (no weight copies) with TL's hook names and shapes:

    hook_patch_embed [B, P, D]   conv patch embeddings
    ln_pre.hook_scale / hook_normalized
    hook_embed [B, T, D]         class + patch + position embedding after ln_pre: the residual stream's
                                 start, so TL's `decompose_resid` sums to the residual stream
    blocks.{i}.                  hook_resid_pre, ln1.*, attn.hook_q|k|v|z|attn_scores|pattern|result,
                                 hook_attn_out, hook_resid_mid, ln2.*, mlp.hook_pre|post, hook_mlp_out,
                                 hook_resid_post
    ln_final.hook_scale / hook_normalized [B, T, 1] / [B, T, D]   open_clip's `ln_post`, on every token
    hook_ln_post [B, D]          the pooled CLS token after ln_post
    hook_image_embed [B, E]      after the projection, before normalisation

`run_with_cache` returns a TL `ActivationCache`; `cfg` is a `HookedTransformerConfig`. SAEs are
spliced in the `HookedSAETransformer` way (see `splice.py`).
"""

from __future__ import annotations

import difflib
from functools import partial
from typing import Any, Callable

import open_clip
import torch
import torch.nn as nn
from open_clip.transform import PreprocessCfg, image_transform_v2
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from ..splice import SAESpliceMixin
from . import open_clip_vit
from .components import LayerNorm, TransformerBlock

BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
POOLED_HOOKS = ("hook_ln_post", "hook_image_embed")  # [B, width]: no position dimension


class HookedCLIP(SAESpliceMixin, HookedRootModule):
    """CLIP with a hooked image tower (see the module docstring for the hook names)."""

    def __init__(
        self,
        clip_model: nn.Module,
        model_name: str = "custom",
        pretrained: str | None = None,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        tokenizer: Callable[..., torch.Tensor] | None = None,
        use_attn_result: bool = False,
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        visual = getattr(clip_model, "visual", None)
        if visual is None:
            raise TypeError(f"expected an open_clip CLIP model with a `.visual` tower, got {type(clip_model).__name__}")
        open_clip_vit.check_standard_vit(visual)
        self.clip = clip_model.eval()
        self.cfg = open_clip_vit.build_config(clip_model, model_name, pretrained, visual.class_embedding.device,
                                              use_attn_result=use_attn_result, model_kwargs=model_kwargs)
        self.hook_patch_embed = HookPoint()
        self.ln_pre = LayerNorm(visual.ln_pre)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(TransformerBlock(b, self.cfg) for b in visual.transformer.resblocks)
        self.ln_final = LayerNorm(visual.ln_post)
        self.hook_ln_post = HookPoint()
        self.hook_image_embed = HookPoint()
        self.preprocess = preprocess or image_transform_v2(
            PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip_model)), is_train=False
        )
        self.tokenizer = tokenizer or self._default_tokenizer(model_name, clip_model)
        self.init_splice()
        self.setup()

    @staticmethod
    def _default_tokenizer(model_name: str, clip_model: nn.Module) -> Callable[..., torch.Tensor]:
        context_length = open_clip.get_model_tokenize_cfg(clip_model).get("context_length")
        try:
            return open_clip.get_tokenizer(model_name, context_length=context_length)
        except Exception:  # unknown custom name: CLIP's BPE tokenizer is the open_clip default
            return open_clip.SimpleTokenizer(context_length=context_length or 77)

    @classmethod
    def from_pretrained(
        cls, model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
        use_attn_result: bool = False, **open_clip_kwargs: Any,
    ) -> "HookedCLIP":
        """Build with `open_clip.create_model_and_transforms`; arguments mean what they mean there.

        When the pretrained tag was trained with QuickGELU (OpenAI's weights, LAION-400M's, ...), the
        network is built with QuickGELU even if the name lacks `-quickgelu`, so that `ViT-B-32` +
        `openai` is the same network as `ViT-B-32-quickgelu` + `openai`.
        """
        model, preprocess = open_clip_vit.create(model_name, pretrained, device, **open_clip_kwargs)
        arch_kwargs = {k: v for k, v in open_clip_kwargs.items() if k != "force_quick_gelu"}
        return cls(model, model_name=model_name, pretrained=pretrained, preprocess=preprocess,
                   use_attn_result=use_attn_result, model_kwargs=arch_kwargs)

    # ------------------------------------------------------------------ hook names
    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def check_hook_name(self, name: str) -> None:
        if name not in self.hook_dict:
            close = difflib.get_close_matches(name, self.hook_names, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise KeyError(f"unknown hook name {name!r}.{hint} Valid hook names: {self.hook_names}")

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
            if keep(name):
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
                    raise ValueError(f"incl_bwd=True needs a scalar to back-propagate; the output has shape "
                                     f"{tuple(loss.shape)}: pass backward_fn=lambda embed: <scalar>")
                loss.backward()
        if not return_cache_object:
            return out, cache_dict
        return out, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    # ------------------------------------------------------------------ forward passes
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def device(self) -> torch.device:
        return self.visual.class_embedding.device

    def to(self, *args: Any, **kwargs: Any) -> "HookedCLIP":  # keep cfg.device/dtype true, as TL does
        out = super().to(*args, **kwargs)
        self.cfg.device = str(self.device)
        self.cfg.dtype = self.visual.class_embedding.dtype
        return out

    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images -> the residual stream's start `[B, T, D]` (open_clip's `VisionTransformer._embeds`)."""
        v = self.visual
        x = v.conv1(images_BCHW.to(v.conv1.weight.dtype))
        x = self.hook_patch_embed(x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1))
        cls_tok = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1) + v.positional_embedding.to(x.dtype)
        return self.hook_embed(self.ln_pre(v.patch_dropout(x)))

    def run_blocks(self, resid_BTD: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks `start .. stop-1` on the residual stream."""
        for block in self.blocks[start:stop]:
            resid_BTD = block(resid_BTD)
        return resid_BTD

    def head(self, final_resid: torch.Tensor) -> torch.Tensor:
        """`ln_post`, CLS pooling and projection: the tower after the last block.

        Accepts the full final residual stream `[B, T, D]` or only its CLS token `[B, D]`
        (`ln_post` acts per token, so both give the same embedding).
        """
        normed = self.ln_final(final_resid)
        pooled_BD = self.hook_ln_post(normed[:, 0] if normed.ndim == 3 else normed)
        embed_BE = pooled_BD @ self.visual.proj if self.visual.proj is not None else pooled_BD
        return self.hook_image_embed(embed_BE)

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

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """open_clip's `encode_text`, trimmed to the longest prompt in the batch.

        Prompts are padded to 77 tokens, but CLIP's text tower is causal and pools the EOT token, so
        positions after the last EOT cannot change the result. Dropping them makes prompt ensembles
        (80 templates x 200 classes) several times cheaper. Other text towers run unchanged.
        """
        clip = self.clip
        trimmable = (
            type(clip).__name__ == "CLIP" and getattr(clip, "text_pool_type", None) == "argmax"
            and getattr(clip, "attn_mask", None) is not None
        )
        if not trimmable:
            return clip.encode_text(tokens, normalize=normalize)
        n = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the highest token id
        tokens = tokens[:, :n]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:n].to(cast_dtype)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = clip.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp())


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
    raise ValueError("names_filter must be a string, a list of strings, or a function")
