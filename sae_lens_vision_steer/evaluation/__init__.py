"""Evaluation runner: zero-shot accuracy of steering methods, sharing one backbone pass.

The backbone runs once: the tokens at the SAE's hook are cached in memory for the evaluation set
(the forward stops right after the hook's block), and every method and setting maps the cached CLS
tokens through the rest of the tower (for the final block: `model.head`, i.e. ln_post + projection).
Methods that need other layers (SAE-rec all) declare `kind="pass"` and get their own hooked pass.

A method is a registered function, so new ones plug in without touching the loop:

    @register_method("my_method", description="...")
    def my_method(tokens_ND, ctx, *, lam, gamma, **_):
        return MethodOutput(tokens=..., coverage=...)      # or embeds=[N, E]

`kind="pass"` methods are called as `fn(ctx, **settings)` and return a `TokenIntervention` (or a
list of forward hooks); the runner classifies a full hooked pass over `ctx.data`. A method may
register `prepare(ctx)`, run before the backbone pass to check its inputs (a pool cache, layer SAEs).

The FVU gate is per method: `fvu_threshold` reaches only the methods in `gate_methods` (default
`vs2`, as in the paper); `results.json` lists them under `config.gated_methods`.
Results and plots are in `results.py`.
"""

from . import methods  # noqa: F401  (registers the built-in methods)
from .methods.builtin import sae_reconstruction
from .registry import (
    DEFAULT_GATED_METHODS,
    DEFAULT_METHODS,
    METHODS,
    Method,
    MethodContext,
    MethodOutput,
    get_method,
    register_method,
)
from .results import (  # re-exported: the results API used to live here
    RESULTS_FILE,
    EvaluationResult,
    MethodScores,
    SweepResult,
    format_table,
    plot_per_class_changes,
    plot_sweep_heatmap,
)
from .runner import Evaluator, MethodSpec, evaluate, sweep_vs2
from .tokens import HookTokens, cache_hook_tokens, hook_cut, make_tower_tail

__all__ = [
    "DEFAULT_GATED_METHODS", "DEFAULT_METHODS", "EvaluationResult", "Evaluator", "HookTokens", "METHODS", "Method",
    "MethodContext", "MethodOutput", "MethodScores", "MethodSpec", "RESULTS_FILE", "SweepResult", "cache_hook_tokens",
    "evaluate", "format_table", "get_method", "hook_cut", "make_tower_tail", "plot_per_class_changes",
    "plot_sweep_heatmap", "register_method", "sae_reconstruction", "sweep_vs2",
]
