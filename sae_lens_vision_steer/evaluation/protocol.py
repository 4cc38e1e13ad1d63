"""The prompt protocol of a result row: which class-prompt templates its zero-shot head uses.

The templates are part of a method's definition (the paper's Table 1(a) rows use the single prompt
"a photo of a {}.", its "VS2 + Ens" row the data set's ensemble), so each row names its own:

- `None`: the run's templates (`--templates`; by default the data set's ensemble);
- `"ensemble"`: the data set's own ensemble (CLIP's 18 CIFAR / 80 ImageNet templates, the bird template
  for CUB, CLIP-benchmark's for the OOD sets);
- a set name (`single`, `cifar`, `imagenet`, `cub`) or a list of template strings;
- `"none"`: no prompts at all (a linear probe's own head).

`Protocols` holds one `ZeroShotClassifier` per template list for a run (the text cache shared), and the
zero-shot result of the shared backbone pass under each, so a row's change can be read against
zero-shot with the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import UnknownNameError, UsageError
from ..data.resources import DEFAULT_TEMPLATES, templates_for

SINGLE_TEMPLATE = "a photo of a {}."
ENSEMBLE = "ensemble"
NO_PROMPTS = "none"
TemplatesSpec = str | Sequence[str] | None


@dataclass(frozen=True)
class Protocol:
    """Resolved templates: the strings and, when they are a shipped set, its name."""

    templates: tuple[str, ...]
    name: str | None = None  # single | cifar | imagenet | cub, or None for a list (e.g. CLIP-benchmark's)

    @property
    def uses_prompts(self) -> bool:
        return bool(self.templates)

    def record(self) -> str | list[str]:
        """What `results.json` stores: the set name, or the list."""
        if not self.templates:
            return NO_PROMPTS
        return self.name if self.name else list(self.templates)

    @property
    def label(self) -> str:
        """Short form for tables: `single`, `imagenet (80)`, `custom (7)`, `none`."""
        if not self.templates:
            return "none"
        if self.name == "single" or (self.name is None and self.templates == (SINGLE_TEMPLATE,)):
            return "single"
        n = len(self.templates)
        return f"{self.name or 'custom'} ({n})" if n > 1 or self.name is None else f"{self.name} (1)"

    def classifier_templates(self) -> str | list[str]:
        """What `ZeroShotClassifier` takes (a set name keeps the text cache's named slot)."""
        return self.name if self.name else list(self.templates)


def check_templates_name(spec: TemplatesSpec) -> None:
    """Refuse an unknown template set name now (before any backbone pass), with the known ones."""
    if isinstance(spec, str) and spec not in (ENSEMBLE, NO_PROMPTS):
        try:
            templates_for(spec)
        except UnknownNameError as e:
            raise UnknownNameError(f"{e}, or {ENSEMBLE!r} (the data set's own ensemble)") from None


def dataset_ensemble(data: Any) -> Protocol:
    """The data set's own template ensemble."""
    from ..data.ood import dataset_templates

    found = dataset_templates(data, DEFAULT_TEMPLATES.get(getattr(data, "dataset_id", ""), "single"))
    if isinstance(found, str):
        return Protocol(tuple(templates_for(found)), DEFAULT_TEMPLATES.get(found, found))
    return Protocol(tuple(found), None)


def resolve(spec: TemplatesSpec, data: Any, run: Protocol | None = None) -> Protocol:
    """`spec` (see the module docstring) for the data set `data`; `run` is the run's protocol (for None)."""
    if spec is None:
        if run is None:
            raise UsageError("no run protocol to fall back on (templates=None)")
        return run
    if isinstance(spec, str):
        if spec == ENSEMBLE:
            return dataset_ensemble(data)
        if spec == NO_PROMPTS:
            return Protocol(())
        check_templates_name(spec)
        name = DEFAULT_TEMPLATES.get(spec, spec)
        return Protocol(tuple(templates_for(name)), name)
    templates = tuple(spec)
    if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise UsageError(f"templates must be a set name or a non-empty list of strings with '{{}}', got {spec!r}")
    return Protocol(templates, None)


def run_classifier(model: Any, data: Any, templates: TemplatesSpec = None, show_progress: bool = True,
                   text_cache: str | Path | None = None) -> Any:
    """The run's zero-shot head (`--templates`; None or "ensemble": the data set's own ensemble)."""
    from ..zeroshot.classifier import ZeroShotClassifier

    if templates == NO_PROMPTS:
        raise UsageError("the run's templates must give the zero-shot row prompts; 'none' is for a method with its "
                         "own head")
    run = dataset_ensemble(data) if templates in (None, ENSEMBLE) else resolve(templates, data)
    return ZeroShotClassifier(model, data.classnames, run.classifier_templates(), show_progress=show_progress,
                              text_cache=text_cache)


def protocol_of(classifier: Any) -> Protocol:
    """The protocol a `ZeroShotClassifier` was built with (its set name when it has one)."""
    templates = tuple(classifier.templates)
    for name in ("single", "cifar", "imagenet", "cub"):
        try:
            if tuple(templates_for(name)) == templates:
                return Protocol(templates, name)
        except UnknownNameError:  # a shipped table without this set
            continue
    return Protocol(templates, None)


class Protocols:
    """One zero-shot classifier per template list for one run, built on demand (text cache shared)."""

    def __init__(self, model: Any, data: Any, run_classifier: Any, show_progress: bool = True,
                 text_cache: str | Path | None = None):
        self.model, self.data, self.show_progress = model, data, show_progress
        self.run = protocol_of(run_classifier)
        if text_cache is None and getattr(run_classifier, "text_cache_path", None) is not None:
            text_cache = run_classifier.text_cache_path.parent
        self.text_cache = text_cache
        self._classifiers: dict[tuple[str, ...], Any] = {self.run.templates: run_classifier}
        self.status: dict[str, str] = {}  # protocol label -> text cache status

    def resolve(self, spec: TemplatesSpec) -> Protocol:
        return resolve(spec, self.data, self.run)

    def classifier(self, protocol: Protocol) -> Any:
        """The classifier for `protocol` (for a protocol without prompts: the run's, never used for logits)."""
        if not protocol.uses_prompts:
            return self._classifiers[self.run.templates]
        if protocol.templates not in self._classifiers:
            from ..zeroshot.classifier import ZeroShotClassifier

            clf = ZeroShotClassifier(self.model, self._classifiers[self.run.templates].classnames,
                                     protocol.classifier_templates(), show_progress=self.show_progress,
                                     text_cache=self.text_cache)
            self._classifiers[protocol.templates] = clf
            self.status[protocol.label] = clf.text_cache_status
        return self._classifiers[protocol.templates]


__all__ = ["ENSEMBLE", "NO_PROMPTS", "Protocol", "Protocols", "SINGLE_TEMPLATE", "TemplatesSpec",
           "check_templates_name", "dataset_ensemble", "protocol_of", "resolve", "run_classifier"]
