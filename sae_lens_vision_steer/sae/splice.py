"""SAEs and transcoders spliced into a `HookedCLIP`, with `sae_lens.HookedSAETransformer` semantics.

`HookedSAETransformer` subclasses `HookedTransformer` (a language model), so it cannot wrap an image
tower; this mixin mirrors its API and semantics instead: `add_sae(sae, use_error_term=...)`,
`reset_saes`, `run_with_saes`, `run_with_cache_with_saes`, `run_with_hooks_with_saes`, the `saes(...)`
context manager, `acts_to_saes`, and cache keys `<hook>.hook_sae_input|acts_pre|acts_post|recons|
error|output`. With `use_error_term=True` the output equals the clean output; without it, the
reconstruction replaces the activation.

Where it differs, and why:
- Position-aware. SAELens' `_SAEWrapper` encodes every position and masks afterwards; an SAE trained
  on CLS tokens only (its metadata says `positions: cls`) is applied to the CLS token only, and patch
  tokens pass through untouched and uncomputed (a ViT-B/32 forward has 50 tokens, so this is 50x less
  SAE work). The SAE's cache entries then hold the selected positions only: `[B, n_selected, d_sae]`.
  A `token_mask` (`True` = bypass, as SAELens' exclusion mask) can exclude further positions.
- The hook point stays. SAELens replaces the hook point with its wrapper; here the splice is a
  permanent hook that runs first on the hook point, and the SAE's hook points hang below it. Hooks on
  the original name (VS2 steering, patching, caching) still attach, and see the spliced output.
- `add_sae` on a hook that already has an SAE is refused unless `replace=True` (SAELens overwrites).
- The SAE's recorded model, activation function and positions are checked against the model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from sae_lens import SAE
from transformer_lens.hook_points import HookPoint

from ..core.errors import UnknownNameError, UsageError
from ..core.positions import POOLED_HOOKS, POSITION_NAMES, position_index, token_set
from ..models.hooked import HookedViT
from .match import check_sae_matches_model

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")


@dataclass
class SpliceSite:
    sae: SAE
    input_hook: str
    output_hook: str
    positions: str | tuple[int, ...]
    use_error_term: bool
    token_mask: torch.Tensor | None = None  # [T] or [B, T] bool, True = bypass
    hook_sae_error: HookPoint = field(default_factory=HookPoint)
    hook_sae_output: HookPoint = field(default_factory=HookPoint)
    captured: torch.Tensor | None = None  # transcoders: the input hook's activation
    handles: list = field(default_factory=list)  # (hook point, TL LensHandle) of our permanent hooks

    @property
    def is_transcoder(self) -> bool:
        return self.input_hook != self.output_hook


def trained_positions(sae: SAE) -> str:
    """The positions an SAE was trained on, from its metadata (`all` when it records none, as SAELens)."""
    return sae.cfg.metadata.get("positions") or "all"


def resolve_positions(sae: SAE, positions: str | Sequence[int] | None, n_tokens: int,
                      n_prefix: int = 1) -> str | tuple[int, ...]:
    trained = trained_positions(sae)
    if positions is None:
        return trained
    if not isinstance(positions, str):
        positions = tuple(int(p) for p in positions)
    wanted = token_set(positions, n_tokens, n_prefix)
    allowed = token_set(trained, n_tokens, n_prefix) if trained in POSITION_NAMES else None
    if allowed is not None and not wanted <= allowed:
        raise UsageError(f"this SAE was trained on {trained!r} tokens; it cannot run on positions {positions!r} "
                         f"(token indices {sorted(wanted - allowed)[:8]} are outside what it was trained on)")
    return positions


@contextlib.contextmanager
def _hooks_disabled(sae: SAE) -> Iterator[None]:
    # As SAELens' own (private) `_disable_hooks`: swap the SAE's hook points for identities.
    try:
        for name in sae.hook_dict:
            setattr(sae, name, torch.nn.Identity())
        yield
    finally:
        for name, hook in sae.hook_dict.items():
            setattr(sae, name, hook)


class SAESpliceMixin:
    """The `HookedSAETransformer` API for `HookedCLIP` (see the module docstring)."""

    def init_hooks(self) -> None:
        self._splices: dict[str, SpliceSite] = {}  # keyed by input hook, as SAELens' _acts_to_saes

    @property
    def acts_to_saes(self) -> dict[str, SAE]:
        return {name: site.sae for name, site in self._splices.items()}

    # ------------------------------------------------------------------ attach / detach
    def add_sae(self, sae: SAE, use_error_term: bool | None = None, positions: str | Sequence[int] | None = None,
                token_mask: torch.Tensor | None = None, replace: bool = False, check_model: bool = True) -> None:
        """Splice `sae` (or a transcoder) into the hook its metadata names.

        `positions` defaults to the ones the SAE was trained on; `token_mask` (`[T]` or `[B, T]`, True =
        bypass) excludes more. `check_model=False` skips the recorded-model check.
        """
        meta = sae.cfg.metadata
        input_hook = meta.get("hook_name")
        if not input_hook:
            raise UsageError("the SAE's metadata records no hook_name; set sae.cfg.metadata.hook_name first")
        output_hook = meta.get("hook_name_out") or input_hook
        self.check_hook_name(input_hook)
        if output_hook != input_hook and output_hook not in self.hook_dict:
            raise UnknownNameError(f"the transcoder's output hook {output_hook!r} does not exist on this model "
                           f"(input hook {input_hook!r})")
        if input_hook in self._splices and not replace:
            raise UsageError(f"an SAE is already spliced at {input_hook!r}; pass replace=True to replace it, "
                             "or reset_saes() first")
        if any(s.output_hook == output_hook for n, s in self._splices.items() if n != input_hook):
            raise UsageError(f"another transcoder already writes {output_hook!r}")
        width_in = self.hook_width(input_hook)
        if sae.cfg.d_in != width_in:
            raise UsageError(f"SAE d_in={sae.cfg.d_in} does not match hook {input_hook!r}, whose width is {width_in}")
        d_out = getattr(sae.cfg, "d_out", sae.cfg.d_in)
        if output_hook != input_hook and d_out != self.hook_width(output_hook):
            raise UsageError(f"transcoder d_out={d_out} does not match hook {output_hook!r}, "
                             f"whose width is {self.hook_width(output_hook)}")
        if check_model:
            check_sae_matches_model(sae, self)
        pos = resolve_positions(sae, positions, self.cfg.n_tokens, self.cfg.n_prefix_tokens)
        if pos in ("cls", "patches") and input_hook not in POOLED_HOOKS:
            position_index(self.cfg, pos, input_hook)  # `cls` on a model without a CLS token: refused
        # Everything is checked: from here on nothing can fail half-way.
        if input_hook in self._splices:
            self._detach(input_hook)
        site = SpliceSite(sae, input_hook, output_hook, pos,
                          sae.use_error_term if use_error_term is None else use_error_term, token_mask)
        self._attach(site)

    def _attach(self, site: SpliceSite) -> None:
        out_point: HookPoint = self.hook_dict[site.output_hook]
        for name in SAE_HOOKS:
            out_point.add_module(name, getattr(site.sae, name))
        out_point.add_module("hook_sae_error", site.hook_sae_error)
        out_point.add_module("hook_sae_output", site.hook_sae_output)
        if site.is_transcoder:
            def capture(act: torch.Tensor, hook: HookPoint) -> None:  # noqa: ARG001
                site.captured = act

            self._permanent_hook(site, self.hook_dict[site.input_hook], capture)
        self._permanent_hook(site, out_point, lambda act, hook: self._splice(act, site))
        self._splices[site.input_hook] = site
        self.setup()

    @staticmethod
    def _permanent_hook(site: SpliceSite, point: HookPoint, fn: Any) -> None:
        # prepend: the splice runs before any other hook on the point, so those see the spliced output.
        point.add_hook(fn, is_permanent=True, prepend=True)
        site.handles.append((point, next(h for h in point.fwd_hooks if h.user_hook is fn)))

    def _detach(self, input_hook: str) -> SpliceSite:
        site = self._splices.pop(input_hook)
        out_point = self.hook_dict[site.output_hook]
        for name in (*SAE_HOOKS, "hook_sae_error", "hook_sae_output"):
            delattr(out_point, name)
        for point, handle in site.handles:  # only our own hooks: the user's permanent hooks stay
            handle.hook.remove()
            if handle in point.fwd_hooks:
                point.fwd_hooks.remove(handle)
        site.handles.clear()
        self.setup()
        return site

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        names = [act_names] if isinstance(act_names, str) else list(act_names or self._splices)
        for name in names:
            if name not in self._splices:
                raise UnknownNameError(f"no SAE is spliced at {name!r}; spliced: {list(self._splices)}")
        for name in names:
            self._detach(name)

    @contextlib.contextmanager
    def saes(self, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True, use_error_term: bool | None = None,
             **add_kwargs: Any):
        """Splice SAEs for the duration of the block; on exit, earlier splices at those hooks come back."""
        saes = [saes] if isinstance(saes, SAE) else list(saes)
        previous = [(s.cfg.metadata.get("hook_name"), self._splices.get(s.cfg.metadata.get("hook_name"))) for s in saes]
        added: list[str] = []
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term=use_error_term, replace=True, **add_kwargs)
                added.append(sae.cfg.metadata.get("hook_name"))
            yield self
        finally:
            if reset_saes_end:
                for name in reversed(added):
                    if name in self._splices:
                        self._detach(name)
                for name, site in previous:
                    if site is not None and name not in self._splices:
                        self._attach(site)

    def run_with_saes(self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                      use_error_term: bool | None = None, **model_kwargs: Any) -> torch.Tensor:
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, **kwargs: Any):
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(self, *model_args: Any, saes: SAE | Sequence[SAE] = (),
                                 reset_saes_end: bool = True, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (),
                                 **kwargs: Any):
        with self.saes(saes, reset_saes_end=reset_saes_end):
            return self.run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), **kwargs)

    def sae_hook_width(self, name: str) -> int:
        for site in self._splices.values():
            if name.startswith(site.output_hook + "."):
                leaf = name.rsplit(".", 1)[-1]
                if leaf in ("hook_sae_acts_pre", "hook_sae_acts_post"):
                    return site.sae.cfg.d_sae
                if leaf == "hook_sae_input":
                    return site.sae.cfg.d_in
                return getattr(site.sae.cfg, "d_out", site.sae.cfg.d_in)
        raise UnknownNameError(f"no spliced SAE owns hook {name!r}")

    # ------------------------------------------------------------------ the splice itself
    def _splice(self, act: torch.Tensor, site: SpliceSite) -> torch.Tensor:
        x_in = site.captured if site.is_transcoder else act
        site.captured = None
        if act.ndim == 2 or site.positions == "all":
            idx: Any = slice(None)
        elif site.positions == "cls":
            idx = slice(0, 1)
        elif site.positions == "patches":
            idx = slice(self.cfg.n_prefix_tokens, None)
        else:
            idx = list(site.positions)
        pooled = act.ndim == 2
        sel_in = x_in if pooled else x_in[:, idx]
        original = act if pooled else act[:, idx]
        sae = site.sae
        recons = sae.decode(sae.encode(sel_in.to(sae.W_dec.dtype))).to(act.dtype)
        mask = None
        if site.token_mask is not None and not pooled:
            m = site.token_mask.to(act.device)
            mask = (m[idx] if m.ndim == 1 else m[:, idx])[..., None]  # [.., n_sel, 1]
        if site.use_error_term:
            with torch.no_grad():
                if any(h.fwd_hooks for h in (getattr(sae, n) for n in SAE_HOOKS)):
                    # A hook edits the SAE's internals: the error term comes from a clean pass (SAELens).
                    with _hooks_disabled(sae):
                        clean = sae.decode(sae.encode(sel_in.to(sae.W_dec.dtype))).to(act.dtype)
                else:  # no hook on the SAE: the clean reconstruction is `recons` itself
                    clean = recons
                error = original - clean
                if mask is not None:
                    error = torch.where(mask, torch.zeros_like(error), error)
                error = site.hook_sae_error(error)
            recons = recons + error
        if mask is not None:
            recons = torch.where(mask, original, recons)
        recons = site.hook_sae_output(recons)
        if pooled or site.positions == "all":
            return recons
        out = act.clone()  # other hooks may hold a reference to `act`
        out[:, idx] = recons
        return out


class HookedCLIP(SAESpliceMixin, HookedViT):
    """A hooked vision tower with the `HookedSAETransformer` splice API: what `from_pretrained` returns."""
