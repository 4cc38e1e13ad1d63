"""TransformerLens-style components around an open_clip ViT block, hook points inside.

As in `transformer_lens/components/`, each class owns one piece of the block and places TL's hook
names and shapes inside it. Unlike TL, the weights are not copied: every component holds the open_clip
module it mirrors outside the module tree (so the state dict and the parameters stay open_clip's, and
are not duplicated), and exposes TL's weight names (`W_Q`, `b_Q`, ..., `W_in`, `W_out`) as *views* of
open_clip's parameters.

Speed: each component has a fused path (open_clip's own `F.layer_norm`, PyTorch's
`scaled_dot_product_attention`) and an explicit path that materialises the hooked intermediates. The
explicit path runs only when a hook is attached to an intermediate the fused path never forms (the LN
scale, the attention scores or pattern, the per-head result), which is also the case while
`run_with_cache` records them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformer_lens.hook_points import HookPoint

# Shape suffixes: B batch, T tokens (query/key positions), D d_model, H heads, K d_head, M d_mlp.


def has_hooks(*points: HookPoint) -> bool:
    """True when any of the hook points has a forward or backward hook attached (caching included)."""
    return any(p.fwd_hooks or p.bwd_hooks for p in points)


def _hold(owner: nn.Module, name: str, module: nn.Module) -> None:
    """Keep a reference to an open_clip module without registering it (it lives under `model.clip`)."""
    object.__setattr__(owner, name, module)


class LayerNorm(nn.Module):
    """open_clip's LayerNorm with TL's `hook_scale` `[B, T, 1]` and `hook_normalized` `[B, T, D]`."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        _hold(self, "_ln", ln)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    @property
    def w(self) -> torch.Tensor:
        return self._ln.weight

    @property
    def b(self) -> torch.Tensor:
        return self._ln.bias

    @property
    def eps(self) -> float:
        return self._ln.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln = self._ln
        if not has_hooks(self.hook_scale, self.hook_normalized):
            return ln(x)
        # TL's LayerNorm, written out. open_clip's LayerNormFp32 normalises in float32; so do we.
        dtype = x.dtype
        if type(ln).__name__ == "LayerNormFp32":
            x = x.float()
        var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)  # one pass for both
        scale = self.hook_scale((var + ln.eps).sqrt())
        x = self.hook_normalized((x - mean) / scale)
        if ln.weight is not None:
            x = torch.addcmul(ln.bias, x, ln.weight) if ln.bias is not None else x * ln.weight
        elif ln.bias is not None:
            x = x + ln.bias
        return x.to(dtype)


class Attention(nn.Module):
    """Self-attention of an open_clip block (`nn.MultiheadAttention`), head by head.

    Hooks: `hook_q`, `hook_k`, `hook_v`, `hook_z` `[B, T, H, K]`; `hook_attn_scores`, `hook_pattern`
    `[B, H, T_query, T_key]`; `hook_result` `[B, T, H, D]` when `cfg.use_attn_result` is on.
    """

    def __init__(self, mha: nn.MultiheadAttention, cfg):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise TypeError("unsupported nn.MultiheadAttention (separate q/k/v projections, bias_k or add_zero_attn)")
        _hold(self, "_mha", mha)
        self.cfg = cfg
        self.n_heads, self.d_head = mha.num_heads, mha.head_dim
        for name in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_attn_scores", "hook_pattern", "hook_result"):
            setattr(self, name, HookPoint())

    # ---------------------------------------------------------------- TL weights (views, not copies)
    def _in_proj(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        D, H, K = self._mha.embed_dim, self.n_heads, self.d_head
        w = self._mha.in_proj_weight[i * D:(i + 1) * D].view(H, K, D).transpose(1, 2)  # [H, D, K]
        b = self._mha.in_proj_bias[i * D:(i + 1) * D].view(H, K)
        return w, b

    W_Q = property(lambda self: self._in_proj(0)[0])
    W_K = property(lambda self: self._in_proj(1)[0])
    W_V = property(lambda self: self._in_proj(2)[0])
    b_Q = property(lambda self: self._in_proj(0)[1])
    b_K = property(lambda self: self._in_proj(1)[1])
    b_V = property(lambda self: self._in_proj(2)[1])

    @property
    def W_O(self) -> torch.Tensor:  # [H, K, D]
        w = self._mha.out_proj.weight  # [D, H*K]
        return w.view(w.shape[0], self.n_heads, self.d_head).permute(1, 2, 0)

    @property
    def b_O(self) -> torch.Tensor:
        return self._mha.out_proj.bias

    # ---------------------------------------------------------------- forward
    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        mha = self._mha
        B, T, D = x_BTD.shape
        qkv = F.linear(x_BTD, mha.in_proj_weight, mha.in_proj_bias).view(B, T, 3, self.n_heads, self.d_head)
        q_BTHK = self.hook_q(qkv[:, :, 0])
        k_BTHK = self.hook_k(qkv[:, :, 1])
        v_BTHK = self.hook_v(qkv[:, :, 2])
        q, k, v = (t.transpose(1, 2) for t in (q_BTHK, k_BTHK, v_BTHK))  # [B, H, T, K]
        if has_hooks(self.hook_attn_scores, self.hook_pattern):
            scores_BHTT = self.hook_attn_scores(q @ k.transpose(-1, -2) / self.d_head**0.5)
            pattern_BHTT = self.hook_pattern(scores_BHTT.softmax(dim=-1))
            z = pattern_BHTT.to(v.dtype) @ v
        else:  # fused kernel: the scores and the pattern are never formed
            z = F.scaled_dot_product_attention(q, k, v)
        z_BTHK = self.hook_z(z.transpose(1, 2))
        if self.cfg.use_attn_result:  # as TL: per-head results cost [B, T, H, D] memory per layer
            result_BTHD = self.hook_result(torch.einsum("bthk,hkd->bthd", z_BTHK, self.W_O))
            return result_BTHD.sum(dim=2) + self.b_O
        return F.linear(z_BTHK.reshape(B, T, D), mha.out_proj.weight, mha.out_proj.bias)


class MLP(nn.Module):
    """open_clip's `c_fc -> act -> c_proj`, with `hook_pre` and `hook_post` `[B, T, M]`."""

    def __init__(self, mlp: nn.Sequential):
        super().__init__()
        _hold(self, "_mlp", mlp)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    W_in = property(lambda self: self._mlp.c_fc.weight.T)  # [D, M]
    b_in = property(lambda self: self._mlp.c_fc.bias)
    W_out = property(lambda self: self._mlp.c_proj.weight.T)  # [M, D]
    b_out = property(lambda self: self._mlp.c_proj.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        m = self._mlp
        post = self.hook_post(m.gelu(self.hook_pre(m.c_fc(x_BTD))))
        return m.c_proj(post)


class TransformerBlock(nn.Module):
    """One open_clip `ResidualAttentionBlock` with TL's block layout: `ln1 -> attn -> ln2 -> mlp`
    and the residual hooks `hook_resid_pre|attn_out|resid_mid|mlp_out|resid_post` `[B, T, D]`.
    Layer scale (`ls_1`, `ls_2`) is part of `attn_out` / `mlp_out`, as it is part of what each
    sub-layer adds to the residual stream."""

    def __init__(self, block: nn.Module, cfg):
        super().__init__()
        _hold(self, "_block", block)
        self.ln1 = LayerNorm(block.ln_1)
        self.attn = Attention(block.attn, cfg)
        self.ln2 = LayerNorm(block.ln_2)
        self.mlp = MLP(block.mlp)
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
            setattr(self, name, HookPoint())

    def forward(self, resid_pre_BTD: torch.Tensor) -> torch.Tensor:
        blk = self._block
        x = self.hook_resid_pre(resid_pre_BTD)
        attn_out = self.hook_attn_out(blk.ls_1(self.attn(self.ln1(x))))
        x = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(blk.ls_2(self.mlp(self.ln2(x))))
        return self.hook_resid_post(x + mlp_out)
