"""`vs2_last_n`: VS2 at the last n blocks at once, each with its own SAE (the paper's "steering the last
2 or 3 layers" ablation), as an evaluation-runner method of kind `pass` (later blocks see the steered
earlier ones, so it needs its own hooked backbone pass). It wraps `steering.vs2.VS2Steering.last_n`;
the SAEs come in `options["last_n_saes"]`, ordered from block n - len to block n - 1.
"""

from __future__ import annotations

from typing import Any

from ..evaluation import MethodContext, register_method
from ..steering.vs2 import PAPER_GAMMA, PAPER_LAM, VS2Steering


def _check(ctx: MethodContext) -> None:
    saes = ctx.options.get("last_n_saes")
    if not saes:
        raise ValueError("method 'vs2_last_n' needs options['last_n_saes'] (one SAE per steered block, in order)")
    VS2Steering.last_n(list(saes), model=ctx.model)  # wrong hooks or order fail here, before the pass


@register_method("vs2_last_n", kind="pass", needs_sae=False, prepare=_check,
                 description="VS2 at each of the last n blocks (one SAE per block, options['last_n_saes'])")
def vs2_last_n(ctx: MethodContext, *, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA, **_: Any) -> VS2Steering:
    return VS2Steering.last_n(list(ctx.options["last_n_saes"]), model=ctx.model, lam=lam, gamma=gamma)


__all__ = ["vs2_last_n"]
