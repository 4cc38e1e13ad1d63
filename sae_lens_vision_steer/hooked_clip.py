"""An open_clip CLIP image tower as a TransformerLens `HookedRootModule`.

The wrapper re-runs the tower's own submodules (no weight copies) with `HookPoint`s placed the
TransformerLens way, so `run_with_cache`, `run_with_hooks`, `hooks(...)` and `add_hook` work as on a
`HookedTransformer`, and SAELens can read hook names such as `blocks.11.hook_resid_post`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import open_clip
import torch
import torch.nn as nn
from open_clip.transform import PreprocessCfg, image_transform_v2
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


@dataclass(frozen=True)
class HookedCLIPConfig:
    model_name: str
    pretrained: str | None
    n_layers: int
    d_model: int
    n_heads: int
    embed_dim: int
    n_tokens: int  # 1 (CLS) + number of patches
    image_size: int
    patch_size: int


class HookedViTBlock(nn.Module):
    """Hook points around one open_clip `ResidualAttentionBlock`.

    The open_clip block is held outside the module tree (it is already registered under
    `clip.visual`), so parameters and the state dict are not duplicated.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "_block", block)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid_pre_BTD: torch.Tensor) -> torch.Tensor:
        # Mirrors open_clip's ResidualAttentionBlock.forward (self-attention, no mask) step by step.
        blk = self._block
        x = self.hook_resid_pre(resid_pre_BTD)
        attn_out = self.hook_attn_out(blk.ls_1(blk.attention(q_x=blk.ln_1(x))))
        x = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(blk.ls_2(blk.mlp(blk.ln_2(x))))
        return self.hook_resid_post(x + mlp_out)


def _check_standard_vit(visual: nn.Module) -> None:
    """Raise a clear error for towers this wrapper does not reproduce exactly."""
    kind = type(visual).__name__
    if kind != "VisionTransformer":
        raise TypeError(
            f"HookedCLIP supports open_clip models with a standard ViT image tower "
            f"(ViT-B-32, ViT-B-16, ViT-L-14 and their -quickgelu variants); this model's image "
            f"tower is a {kind} (e.g. a ResNet, ConvNeXt or timm tower)."
        )
    problems = []
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("attentional pooling")
    if getattr(visual, "pool_type", "tok") != "tok":
        problems.append(f"pool_type={visual.pool_type!r} (expected 'tok', the CLS token)")
    if getattr(visual, "final_ln_after_pool", False):
        problems.append("final_ln_after_pool=True")
    if not getattr(visual.transformer, "batch_first", True):
        problems.append("batch_first=False")
    blocks = list(visual.transformer.resblocks)
    if blocks and type(blocks[0]).__name__ != "ResidualAttentionBlock":
        problems.append(f"block type {type(blocks[0]).__name__}")
    if problems:
        raise TypeError("HookedCLIP needs a standard CLIP ViT tower; unsupported: " + ", ".join(problems))


class HookedCLIP(HookedRootModule):
    """CLIP with a hooked image tower.

    Hook points (tokens are `[batch, 1 + n_patches, d_model]`, CLS at position 0):
    `hook_embed`, `blocks.{i}.hook_resid_pre|hook_attn_out|hook_resid_mid|hook_mlp_out|hook_resid_post`,
    `hook_ln_post` (`[batch, d_model]`, pooled CLS after `ln_post`) and `hook_image_embed`
    (`[batch, embed_dim]`, after the projection, before normalisation).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        model_name: str = "custom",
        pretrained: str | None = None,
        preprocess: Callable[[Any], torch.Tensor] | None = None,
        tokenizer: Callable[..., torch.Tensor] | None = None,
    ):
        super().__init__()
        visual = getattr(clip_model, "visual", None)
        if visual is None:
            raise TypeError(f"expected an open_clip CLIP model with a `.visual` tower, got {type(clip_model).__name__}")
        _check_standard_vit(visual)
        self.clip = clip_model.eval()
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(HookedViTBlock(b) for b in visual.transformer.resblocks)
        self.hook_ln_post = HookPoint()
        self.hook_image_embed = HookPoint()
        self.preprocess = preprocess or image_transform_v2(
            PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip_model)), is_train=False
        )
        self.tokenizer = tokenizer or self._default_tokenizer(model_name, clip_model)
        d_model = visual.class_embedding.shape[-1]
        embed_dim = visual.proj.shape[1] if visual.proj is not None else d_model
        self.cfg = HookedCLIPConfig(
            model_name=model_name,
            pretrained=pretrained,
            n_layers=len(self.blocks),
            d_model=d_model,
            n_heads=visual.transformer.resblocks[0].attn.num_heads,
            embed_dim=embed_dim,
            n_tokens=visual.positional_embedding.shape[0],
            image_size=visual.image_size[0],
            patch_size=visual.patch_size[0],
        )
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
        cls, model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu", **open_clip_kwargs: Any
    ) -> "HookedCLIP":
        """Build with `open_clip.create_model_and_transforms`; arguments mean what they mean there."""
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, **open_clip_kwargs
        )
        return cls(model, model_name=model_name, pretrained=pretrained, preprocess=preprocess)

    # ------------------------------------------------------------------ hook-name validation
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
        return self.cfg.embed_dim if name == "hook_image_embed" else self.cfg.d_model

    def hook_layer(self, name: str) -> int:
        """Index of the block a hook belongs to (-1 for `hook_embed`, n_layers for the head hooks)."""
        self.check_hook_name(name)
        if name.startswith("blocks."):
            return int(name.split(".")[1])
        return -1 if name == "hook_embed" else self.cfg.n_layers

    def add_hook(self, name: Any, hook: Callable, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if isinstance(name, str):
            self.check_hook_name(name)
        super().add_hook(name, hook, *args, **kwargs)

    def _enable_hook(self, name: Any, hook: Callable, dir: Any) -> None:  # used by hooks()/run_with_hooks
        if isinstance(name, str):
            self.check_hook_name(name)
        super()._enable_hook(name, hook, dir)

    # ------------------------------------------------------------------ forward passes
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def device(self) -> torch.device:
        return self.visual.class_embedding.device

    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images_BCHW.to(v.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls_tok = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = self.hook_embed(v.patch_dropout(x))
        return v.ln_pre(x)

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
        cls_BD = final_resid[:, 0] if final_resid.ndim == 3 else final_resid
        pooled_BD = self.hook_ln_post(self.visual.ln_post(cls_BD))
        embed_BE = pooled_BD @ self.visual.proj if self.visual.proj is not None else pooled_BD
        return self.hook_image_embed(embed_BE)

    def forward(
        self, images_BCHW: torch.Tensor, stop_at_layer: int | None = None
    ) -> torch.Tensor:
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
