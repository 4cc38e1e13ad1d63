"""A linear probe: multinomial logistic regression on the training split's image embeddings.

The reviewers of the paper asked for it as an upper reference for VS2++: it reads the training split's
true labels (VS2 and VS2++ read none), so tables mark it "uses training labels".

- Features: the CLIP image embeddings, unit-normalised, then standardised with the training rows' mean
  and standard deviation per dimension (L-BFGS converges in a few dozen steps on standardised inputs).
- Loss: mean cross-entropy + `wd * ||W||^2` (the bias is not penalised), full batch, torch's L-BFGS with a
  strong-Wolfe line search.
- `wd` is chosen from `ProbeConfig.weight_decays` on a held-out `holdout_fraction` of the training rows
  (seeded), then the probe is refitted on all of them with that `wd` (as the CLIP paper's probes sweep
  their regulariser on a validation split).

`cached_linear_probe` stores the fitted probe as safetensors (`weight_EC`, `bias_C`, `mean_E`, `std_E`)
with its key in the header (what it was fitted on: the model's weights, the training rows, their labels
and the settings) and a sha256 of the tensors; a file made differently is refused with one logged line and
refitted. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import InputError, UsageError
from ..core.fileio import write_bytes_atomic

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ProbeConfig:
    weight_decays: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    holdout_fraction: float = 0.1
    max_iter: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.weight_decays or any(w < 0 for w in self.weight_decays):
            raise UsageError(f"weight_decays must be non-negative and not empty, got {self.weight_decays}")
        if not 0 < self.holdout_fraction < 1:
            raise UsageError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")


@dataclass
class LinearProbe:
    weight_EC: torch.Tensor
    bias_C: torch.Tensor
    mean_E: torch.Tensor
    std_E: torch.Tensor
    info: dict[str, Any]

    def features(self, embeds_NE: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeds_NE.float().cpu(), dim=-1)
        return (x - self.mean_E) / self.std_E

    def logits(self, embeds_NE: torch.Tensor) -> torch.Tensor:
        return self.features(embeds_NE) @ self.weight_EC + self.bias_C

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight_EC": self.weight_EC, "bias_C": self.bias_C, "mean_E": self.mean_E, "std_E": self.std_E}


def _fit(x_NE: torch.Tensor, y_N: torch.Tensor, n_classes: int, wd: float, max_iter: int,
         init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    W = (init[0].clone() if init else torch.zeros(x_NE.shape[1], n_classes)).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(n_classes)).requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x_NE @ W + b, y_N) + wd * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def fit_linear_probe(embeds_NE: torch.Tensor, labels_N: torch.Tensor, n_classes: int,
                     cfg: ProbeConfig = ProbeConfig()) -> LinearProbe:
    """Fit the probe on training embeddings and labels (every label in [0, n_classes))."""
    labels = torch.as_tensor(labels_N, dtype=torch.long).cpu()
    if len(labels) != len(embeds_NE) or len(labels) < 2:
        raise InputError(f"a linear probe needs at least 2 labelled rows, one label per embedding; got "
                         f"{len(embeds_NE)} embeddings and {len(labels)} labels")
    if bool((labels < 0).any()) or bool((labels >= n_classes).any()):
        raise InputError(f"a linear probe needs every training row's label in [0, {n_classes}); "
                         f"{int((labels < 0).sum())} rows have none")
    t0 = time.perf_counter()
    x = F.normalize(torch.as_tensor(embeds_NE).float().cpu(), dim=-1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(x), generator=gen)
    n_held = max(1, int(round(cfg.holdout_fraction * len(x))))
    held, fit = order[:n_held], order[n_held:]
    scores: dict[str, float] = {}
    init = None
    for wd in sorted(cfg.weight_decays, reverse=True):  # strong to weak, each warm-started from the last
        init = _fit(x[fit], labels[fit], n_classes, wd, cfg.max_iter, init)
        scores[f"{wd:g}"] = 100.0 * ((x[held] @ init[0] + init[1]).argmax(1) == labels[held]).float().mean().item()
    best = max(sorted(cfg.weight_decays, reverse=True), key=lambda w: scores[f"{w:g}"])  # ties: the stronger
    W, b = _fit(x, labels, n_classes, best, cfg.max_iter)
    train_acc = 100.0 * ((x @ W + b).argmax(1) == labels).float().mean().item()
    info = {"weight_decay": best, "heldout_top1_by_weight_decay": scores, "train_top1": train_acc,
            "n_train_rows": len(x), "n_heldout_rows": n_held, "fit_s": time.perf_counter() - t0, "config": asdict(cfg)}
    return LinearProbe(W, b, mean, std, info)


def _sha(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def probe_key(fitted_on: dict[str, Any], labels_N: torch.Tensor, n_classes: int, cfg: ProbeConfig) -> dict[str, Any]:
    """What a cached probe must match: `fitted_on` (the model's and the rows' fingerprints, the embedding),
    the labels, the class count and the settings."""
    labels = torch.as_tensor(labels_N, dtype=torch.long).cpu().contiguous()
    return {"format_version": FORMAT_VERSION, **fitted_on, "n_classes": n_classes, "config": asdict(cfg),
            "labels_sha256": hashlib.sha256(labels.numpy().tobytes()).hexdigest()}


def cached_linear_probe(embeds_NE: torch.Tensor, labels_N: torch.Tensor, n_classes: int, folder: str | Path,
                        fitted_on: dict[str, Any], cfg: ProbeConfig = ProbeConfig()) -> tuple[LinearProbe, str]:
    """`(probe, status)`: read from `folder` when a file with this key is there (`hit`), else fitted and
    written (`built`, or `rebuilt` when a file made differently was refused)."""
    from safetensors import safe_open
    from safetensors.torch import save

    key = json.loads(json.dumps(probe_key(fitted_on, labels_N, n_classes, cfg), default=str))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(folder) / f"linear_probe-{digest}.safetensors"
    why = None
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            found = json.loads(header["key"])
            if _sha(tensors) != header.get("sha256"):
                why = "its sha256 does not match its contents"
            elif found != key:
                why = "made differently: " + ", ".join(k for k in key if found.get(k) != key[k])
            else:
                return LinearProbe(**tensors, info=json.loads(header.get("info", "{}"))), "hit"
        except Exception as e:  # truncated, not safetensors, no key: damaged
            why = f"unreadable ({type(e).__name__})"
        log.warning("linear-probe cache %s refused (%s); refitting and replacing it", path, why)
    probe = fit_linear_probe(embeds_NE, labels_N, n_classes, cfg)
    tensors = {k: v.float().contiguous() for k, v in probe.tensors().items()}
    header = {"key": json.dumps(key, default=str), "sha256": _sha(tensors), "info": json.dumps(probe.info)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, save(tensors, metadata=header))
    except OSError as e:  # a read-only folder costs the reuse, never the run
        log.warning("could not write the linear-probe cache %s (%s); continuing without it", path, e)
    return probe, "rebuilt" if why else "built"


__all__ = ["LinearProbe", "ProbeConfig", "cached_linear_probe", "fit_linear_probe", "probe_key"]
