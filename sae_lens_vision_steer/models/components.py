"""TransformerLens-style components around a ViT block of any supported library, hook points inside.

As in `transformer_lens/components/`, each class owns one piece of the block and places TL's hook
names and shapes inside it. Unlike TL, the weights are not copied: every component holds the library
module it mirrors outside the module tree (so the state dict and the parameters stay the library's,
and are not duplicated), and exposes TL's weight names (`W_Q`, `b_Q`, ..., `W_in`, `W_out`) as *views*
of the library's parameters. The family adapters (`open_clip_vit.py`, `timm_vit.py`, `hf.py`) say
which library module plays which part.

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


class LinearView:
    """Rows `[start, stop)` of a (possibly fused) linear layer's weight and bias, read fresh on each access
    (so `.to()`, `load_state_dict` and in-place edits show through)."""

    def __init__(self, owner: nn.Module, weight: str = "weight", bias: str | None = "bias",
                 start: int | None = None, stop: int | None = None):
        object.__setattr__(self, "_owner", owner)
        self._w, self._b, self._rows = weight, bias, slice(start, stop)

    @property
    def weight(self) -> torch.Tensor:  # [out, in]
        return getattr(self._owner, self._w)[self._rows]

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self._owner, self._b, None) if self._b else None
        return None if b is None else b[self._rows]


def fused_thirds(owner: nn.Module, width: int, weight: str = "weight", bias: str = "bias") -> tuple:
    """q, k, v views of a fused `[3 * width, d_model]` projection (open_clip's in_proj, timm's qkv)."""
    return tuple(LinearView(owner, weight, bias, i * width, (i + 1) * width) for i in range(3))


class Attention(nn.Module):
    """Multi-head self-attention, head by head, from q/k/v/out projections (`LinearView`s or `nn.Linear`s).

    Hooks: `hook_q`, `hook_k`, `hook_v`, `hook_z` `[B, T, H, K]`; `hook_attn_scores`, `hook_pattern`
    `[B, H, T_query, T_key]`; `hook_result` `[B, T, H, D]` when `cfg.use_attn_result` is on. `hook_q`
    and `hook_k` are what enters the dot product (after the family's q/k norm, where it has one).
    `fused_qkv` (a `[3 H K, D]` projection) only makes the forward one matmul instead of three.
    """

    def __init__(self, cfg, n_heads: int, d_head: int, q, k, v, out, fused_qkv=None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, scale: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.d_head = n_heads, d_head
        self.scale = d_head ** -0.5 if scale is None else scale
        for name, part in (("_q", q), ("_k", k), ("_v", v), ("_out", out), ("_fused", fused_qkv),
                           ("_q_norm", q_norm), ("_k_norm", k_norm)):
            object.__setattr__(self, name, part)
        for name in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_attn_scores", "hook_pattern", "hook_result"):
            setattr(self, name, HookPoint())

    # ---------------------------------------------------------------- TL weights (views, not copies)
    def _w(self, proj) -> torch.Tensor:  # [H, D, K]
        w = proj.weight
        return w.view(self.n_heads, self.d_head, w.shape[-1]).transpose(1, 2)

    def _b(self, proj) -> torch.Tensor:
        b = proj.bias
        return torch.zeros(self.n_heads, self.d_head, device=self._q.weight.device) if b is None else \
            b.view(self.n_heads, self.d_head)

    W_Q = property(lambda self: self._w(self._q))
    W_K = property(lambda self: self._w(self._k))
    W_V = property(lambda self: self._w(self._v))
    b_Q = property(lambda self: self._b(self._q))
    b_K = property(lambda self: self._b(self._k))
    b_V = property(lambda self: self._b(self._v))

    @property
    def W_O(self) -> torch.Tensor:  # [H, K, D]
        w = self._out.weight  # [D, H*K]
        return w.view(w.shape[0], self.n_heads, self.d_head).permute(1, 2, 0)

    @property
    def b_O(self) -> torch.Tensor:
        b = self._out.bias
        return torch.zeros(self._out.weight.shape[0], device=self._out.weight.device) if b is None else b

    # ---------------------------------------------------------------- forward
    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, K = self.n_heads, self.d_head
        if self._fused is not None:
            q, k, v = F.linear(x_BTD, self._fused.weight, self._fused.bias).view(B, T, 3, H, K).unbind(2)
        else:
            q, k, v = (F.linear(x_BTD, p.weight, p.bias).view(B, T, H, K) for p in (self._q, self._k, self._v))
        if self._q_norm is not None:
            q, k = self._q_norm(q), self._k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (self.hook_q(q), self.hook_k(k), self.hook_v(v)))  # [B, H, T, K]
        if has_hooks(self.hook_attn_scores, self.hook_pattern):
            scores_BHTT = self.hook_attn_scores((q @ k.transpose(-1, -2)) * self.scale)
            pattern_BHTT = self.hook_pattern(scores_BHTT.softmax(dim=-1))
            z = pattern_BHTT @ v
        else:  # fused kernel: the scores and the pattern are never formed
            z = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        z_BTHK = self.hook_z(z.transpose(1, 2))
        if self.cfg.use_attn_result:  # as TL: per-head results cost [B, T, H, D] memory per layer
            result_BTHD = self.hook_result(torch.einsum("bthk,hkd->bthd", z_BTHK, self.W_O))
            return result_BTHD.sum(dim=2) + self.b_O
        return F.linear(z_BTHK.reshape(B, T, H * K), self._out.weight, self._out.bias)


class MLP(nn.Module):
    """`fc1 -> act -> fc2` (open_clip's c_fc/c_proj, timm's and HF's fc1/fc2), with `hook_pre` and
    `hook_post` `[B, T, M]`."""

    def __init__(self, fc1: nn.Module, act: nn.Module, fc2: nn.Module):
        super().__init__()
        _hold(self, "_fc1", fc1)
        _hold(self, "_act", act)
        _hold(self, "_fc2", fc2)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    W_in = property(lambda self: self._fc1.weight.T)  # [D, M]
    b_in = property(lambda self: self._fc1.bias)
    W_out = property(lambda self: self._fc2.weight.T)  # [M, D]
    b_out = property(lambda self: self._fc2.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self._fc2(self.hook_post(self._act(self.hook_pre(self._fc1(x_BTD)))))


class TransformerBlock(nn.Module):
    """A pre-norm ViT block with TL's layout: `ln1 -> attn -> ln2 -> mlp` and the residual hooks
    `hook_resid_pre|attn_out|resid_mid|mlp_out|resid_post` `[B, T, D]`. Layer scale (`ls1`, `ls2`,
    where the family has it) is part of `attn_out` / `mlp_out`: it is part of what each sub-layer adds
    to the residual stream."""

    def __init__(self, ln1: nn.Module, attn: Attention, ln2: nn.Module, mlp: MLP,
                 ls1: nn.Module | None = None, ls2: nn.Module | None = None):
        super().__init__()
        # registered in forward order, so hook_dict lists the hooks in the order they fire
        self.hook_resid_pre = HookPoint()
        self.ln1 = LayerNorm(ln1)
        self.attn = attn
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.ln2 = LayerNorm(ln2)
        self.mlp = mlp
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        _hold(self, "_ls1", ls1 if ls1 is not None else nn.Identity())
        _hold(self, "_ls2", ls2 if ls2 is not None else nn.Identity())

    def scale_attn(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output's layer scale (identity without one)."""
        return self._ls1(x)

    def scale_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self._ls2(x)

    def forward(self, resid_pre_BTD: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(resid_pre_BTD)
        attn_out = self.hook_attn_out(self._ls1(self.attn(self.ln1(x))))
        x = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(self._ls2(self.mlp(self.ln2(x))))
        return self.hook_resid_post(x + mlp_out)
