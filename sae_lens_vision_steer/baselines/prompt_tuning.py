"""A learnable prompt context on CLIP's own text tower (CoOp, Zhou et al. 2022), for TPT and C-TPT.

The prompt of class `c` is `[SOT] ctx_1 .. ctx_n <tokens of "{c}."> [EOT]`: the `n` context vectors
replace the token embeddings of the initialising words (`"a photo of a"`, n = 4), so with the context
set to those embeddings the encoder returns exactly the library's `encode_text("a photo of a {c}.")`.

Why a thin re-run of the text tower rather than the library call: `encode_text` takes token ids, and
prompt tuning needs gradients with respect to the token *embeddings* at the context positions. So
this module embeds the tokenized prompts once (the library's `token_embedding`), splices the context
in, and runs the library's own modules from there (open_clip: `positional_embedding`, `transformer`
with its causal `attn_mask`, `ln_final`, EOT pooling by argmax of the token ids, `text_projection`;
transformers: `CLIPTextEmbeddings(inputs_embeds=...)`, the causal mask, `encoder`, `final_layer_norm`,
EOS pooling, `text_projection`). Prompts are cut after the longest EOT, as in `open_clip_vit.encode_text`
(the text tower is causal, so later positions cannot change the pooled EOT state).

The context may carry a batch dimension (`[B, n, W]`, one context per test image): one text pass then
encodes `B x C` prompts, which lets TPT adapt several images at once.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InputError

DEFAULT_CTX_INIT = "a photo of a"  # CoOp/TPT's initialisation (TPT: --ctx_init a_photo_of_a, n_ctx 4)


def text_backend(model: Any) -> str:
    """`"open_clip"` or `"hf_clip"`: which text tower this module can re-run; refuses the others by name."""
    family = getattr(model.cfg, "family", "?")
    name = getattr(model.cfg, "model_name", "?")
    if not model.has_text:
        raise InputError(f"prompt tuning (TPT, C-TPT) needs a text tower; {name} ({family}) is an image-only "
                         "backbone, so it has no text prompts to tune")
    lib = model.clip
    if hasattr(lib, "token_embedding") and hasattr(lib, "transformer") and hasattr(lib, "ln_final"):
        pool = getattr(lib, "text_pool_type", "argmax")
        if pool != "argmax" or getattr(lib, "attn_mask", None) is None:
            raise InputError(f"prompt tuning supports causal text towers pooled at the EOT token; {name} ({family}, "
                             f"open_clip {type(lib).__name__}) pools with {pool!r}"
                             + ("" if getattr(lib, "attn_mask", None) is not None else " and has no causal mask"))
        return "open_clip"
    if type(lib).__name__ == "CLIPModel" and hasattr(lib, "text_model"):
        return "hf_clip"
    raise InputError(f"prompt tuning is implemented for open_clip CLIP and transformers CLIPModel text towers; "
                     f"{name} ({family}, {type(lib).__name__}) has another text tower")


class PromptContextEncoder(nn.Module):
    """Class text features `[.., C, E]` (not normalised) from a learnable context `[n, W]` or `[B, n, W]`.

        enc = PromptContextEncoder(model, classnames)          # context starts at "a photo of a"
        feats_CE = enc(enc.init_ctx)                           # == model.encode_text(tokenize("a photo of a {c}."))

    `init_ctx` is a detached copy of the initial context: TPT starts every test image from it.
    Only the context receives gradients; the text tower's weights are used as they are (frozen by
    never being handed to an optimizer).
    """

    def __init__(self, model: Any, classnames: Sequence[str], ctx_init: str = DEFAULT_CTX_INIT,
                 suffix: str = "."):
        super().__init__()
        self.backend = text_backend(model)
        self.classnames = [str(c) for c in classnames]
        if not self.classnames:
            raise InputError("prompt tuning needs at least one class name")
        self.ctx_init_text = ctx_init
        self._model = [model]  # not a submodule: its parameters stay out of this module's
        init_ids = model.tokenize([ctx_init])[0]
        eot = int(init_ids.argmax())
        self.n_ctx = eot - 1
        if self.n_ctx < 1:
            raise InputError(f"the context initialisation {ctx_init!r} tokenizes to no tokens")
        prompts = [f"{ctx_init} {c}{suffix}" for c in self.classnames]
        ids_CT = model.tokenize(prompts)
        bad = [p for p, row in zip(prompts, ids_CT) if not torch.equal(row[1:1 + self.n_ctx], init_ids[1:1 + self.n_ctx])]
        if bad:
            raise InputError(f"the context words {ctx_init!r} tokenize differently inside the prompt {bad[0]!r}")
        self.prompts = prompts
        t = int(ids_CT.argmax(dim=-1).max()) + 1  # cut after the longest EOT (causal tower)
        ids_CT = ids_CT[:, :t]
        with torch.no_grad():
            emb_CTW = self._token_embedding(ids_CT)
        self.register_buffer("ids_CT", ids_CT, persistent=False)
        self.register_buffer("prefix_C1W", emb_CTW[:, :1].clone(), persistent=False)  # SOT
        self.register_buffer("suffix_CSW", emb_CTW[:, 1 + self.n_ctx:].clone(), persistent=False)  # class, ".", EOT
        with torch.no_grad():
            init = self._token_embedding(init_ids[None, :eot])[0, 1:eot]
        self.register_buffer("init_ctx", init.detach().clone(), persistent=False)
        self.eot_C = ids_CT.argmax(dim=-1)  # EOT has the highest id in CLIP's BPE

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    @property
    def ctx_dim(self) -> int:
        return int(self.init_ctx.shape[-1])

    def _token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        lib = self._model[0].clip
        if self.backend == "open_clip":
            return lib.token_embedding(ids).to(lib.transformer.get_cast_dtype())
        return lib.text_model.embeddings.token_embedding(ids)

    def prompt_embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        """Token embeddings of the prompts with `ctx` spliced in: `[C, T, W]` or `[B, C, T, W]`."""
        if ctx.dim() not in (2, 3) or tuple(ctx.shape[-2:]) != (self.n_ctx, self.ctx_dim):
            raise InputError(f"the context must be [{self.n_ctx}, {self.ctx_dim}] or [B, {self.n_ctx}, {self.ctx_dim}], "
                             f"got {list(ctx.shape)}")
        C = self.n_classes
        ctx = ctx.to(self.prefix_C1W.dtype)
        if ctx.dim() == 2:
            return torch.cat([self.prefix_C1W, ctx[None].expand(C, -1, -1), self.suffix_CSW], dim=1)
        B = ctx.shape[0]
        return torch.cat([self.prefix_C1W[None].expand(B, -1, -1, -1), ctx[:, None].expand(-1, C, -1, -1),
                          self.suffix_CSW[None].expand(B, -1, -1, -1)], dim=2)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        x = self.prompt_embeddings(ctx)
        lead = x.shape[:-2]
        x = x.reshape(-1, *x.shape[-2:])  # [B*C, T, W]
        eot = self.eot_C.to(x.device).repeat(x.shape[0] // self.n_classes)
        out = self._encode_open_clip(x, eot) if self.backend == "open_clip" else self._encode_hf(x, eot)
        return out.reshape(*lead, -1)

    def _encode_open_clip(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        lib, T = self._model[0].clip, x.shape[1]  # open_clip CLIP.encode_text from the embeddings on
        x = x + lib.positional_embedding[:T].to(x.dtype)
        x = lib.ln_final(lib.transformer(x, attn_mask=lib.attn_mask[:T, :T]))
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        proj = lib.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x

    def _encode_hf(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        lib = self._model[0].clip  # transformers CLIPTextModel.forward from the embeddings on
        tm = lib.text_model
        h = tm.embeddings(inputs_embeds=x)
        mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=None, cache=None)
        h = tm.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True).last_hidden_state
        h = tm.final_layer_norm(h)
        return lib.text_projection(h[torch.arange(h.shape[0], device=h.device), eot])

    def class_weights(self, ctx: torch.Tensor) -> torch.Tensor:
        """Normalised class text features, `[C, E]` (or `[B, C, E]`): the zero-shot head's rows."""
        return F.normalize(self(ctx).float(), dim=-1)


def atfd(text_features: torch.Tensor) -> torch.Tensor:
    """C-TPT's Average Text Feature Dispersion (Yoon et al. 2024): the mean L2 distance of the
    normalised class text features `[.., C, E]` from their centroid. Returns `[..]`."""
    t = F.normalize(text_features, dim=-1)
    return (t - t.mean(dim=-2, keepdim=True)).norm(dim=-1).mean(dim=-1)


__all__ = ["DEFAULT_CTX_INIT", "PromptContextEncoder", "atfd", "text_backend"]
