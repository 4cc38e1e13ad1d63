"""The method registry: what a method is (`Method`), what it gets (`MethodContext`) and returns
(`MethodOutput`), and `register_method` / `get_method`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from sae_lens import SAE

from ..core.errors import UnknownNameError, UsageError
from ..data.base import ImageDataset
from ..sae.splice import HookedCLIP
from ..zeroshot.classifier import ZeroShotClassifier

DEFAULT_METHODS = ("zeroshot", "vs2", "rec_final", "rec_final_gamma")
DEFAULT_GATED_METHODS = ("vs2",)  # the paper gates VS2 only


@dataclass
class MethodOutput:
    """What a method returns for the evaluation set: steered tokens at the hook or embeddings."""

    tokens: torch.Tensor | None = None  # [N, D] CLS tokens at the SAE hook
    embeds: torch.Tensor | None = None  # [N, E] image embeddings (skips the rest of the tower)
    logits: torch.Tensor | None = None  # [N, C] class logits (methods with their own head, e.g. TPT)
    coverage: float = 0.0  # fraction of images whose token was changed
    image_forwards: int = 0  # image-tower forwards the method ran itself (TPT: 64 views per image)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodContext:
    """Everything a method may use. `scratch` is shared by all method calls of one run (e.g. for
    neighbour indices that several settings reuse). The evaluation set's labels are set only while a
    method registered with `uses_eval_labels=True` (an oracle) runs, and are None otherwise."""

    model: HookedCLIP
    classifier: ZeroShotClassifier
    sae: SAE | None
    hook_name: str | None
    data: ImageDataset | None
    tokens_to_embeds: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int = 256
    num_workers: int = 2
    show_progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)
    zeroshot_embeds_NE: torch.Tensor | None = None  # plain CLIP image embeddings of the evaluation set
    oracle_labels_N: torch.Tensor | None = None
    # `classifier` is the head of the row being scored (its own prompt protocol); `run_classifier` the
    # run's (`--templates`), which the zero-shot row uses.
    run_classifier: ZeroShotClassifier | None = None

    def require_sae(self, method: str) -> SAE:
        if self.sae is None:
            raise UsageError(f"method {method!r} needs an SAE; give one as sae", arguments=("sae",))
        return self.sae


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    kind: Literal["tokens", "pass"] = "tokens"
    needs_sae: bool = True
    uses_eval_labels: bool = False  # oracle methods: read the evaluation labels (never label-free)
    description: str = ""
    prepare: Callable[["MethodContext"], None] | None = None  # checks run before the backbone pass
    # The prompt protocol the method is defined with (`protocol.py`): None = the run's `--templates`,
    # "ensemble" = the data set's own ensemble, "single", a set name, or "none" (no text head).
    templates: str | None = None
    gate_as: str | None = None  # gated when this method is (`vs2_ens` is gated with `vs2`)
    uses_labels: str | None = None  # labels it reads besides the evaluation ones, e.g. "training labels"
    reads_pool: bool = False  # reads `options["pool_cache"]` (the training split's activation cache)


METHODS: dict[str, Method] = {}


def register_method(name: str, *, kind: Literal["tokens", "pass"] = "tokens", needs_sae: bool = True,
                    uses_eval_labels: bool = False, description: str = "",
                    prepare: Callable[["MethodContext"], None] | None = None, templates: str | None = None,
                    gate_as: str | None = None, uses_labels: str | None = None, reads_pool: bool = False,
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add `fn` to `METHODS` under `name` (replacing an older entry of that name).
    `templates` is the method's prompt protocol (see `Method`); `uses_labels` names labels it reads
    other than the evaluation set's (e.g. the training split's, for a linear probe): tables mark it."""
    if kind not in ("tokens", "pass"):
        raise UsageError(f"method kind must be 'tokens' or 'pass', got {kind!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        METHODS[name] = Method(name, fn, kind, needs_sae, uses_eval_labels,
                               description or (fn.__doc__ or "").strip().split("\n")[0], prepare, templates, gate_as,
                               uses_labels, reads_pool)
        return fn

    return deco


def get_method(name: str) -> Method:
    """A registered method (the built-in ones are registered by `evaluation.methods`, imported with the
    `evaluation` package)."""
    if name not in METHODS:
        raise UnknownNameError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]
