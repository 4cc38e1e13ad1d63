"""The VS2 per-class changes of a `results.json` (from `vision-steer eval`): read, checked against the
cache's classes, and turned into per-class changes with their binomial standard errors."""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError, MissingInputError
from .html import display_text


@dataclass(frozen=True)
class VS2Changes:
    label: str  # the VS2 method's row in results.json
    delta_C: np.ndarray  # VS2 minus zero-shot top-1 per class, points (NaN: class absent from the evaluation)
    std_error_C: np.ndarray | None  # binomial standard error of delta_C, points (None without class counts)
    counts_C: np.ndarray | None  # evaluation images per class (exact, or n_images / n_classes)
    counts_exact: bool


def read_results(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A results.json and its provenance `{"path", "sha256"}`; one-line errors naming the file."""
    path = Path(path)
    where = f"results file {display_text(path)}"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MissingInputError(f"{where} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{where} is not a regular file")
    raw = path.read_bytes()
    try:
        results = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{where} is not UTF-8 text (byte {e.start}): not a results.json") from None
    except ValueError as e:
        raise InputError(f"{where} is not valid JSON ({e}): not a results.json") from None
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict):
        raise InputError(f"{where} is not a results.json of `vision-steer eval` (no 'methods')")
    return results, {"path": display_text(path), "sha256": hashlib.sha256(raw).hexdigest()}


def _accuracies(results: dict[str, Any], method: str, where: str) -> np.ndarray:
    acc = results["methods"][method].get("per_class_acc") if isinstance(results["methods"][method], dict) else None
    ok = isinstance(acc, list) and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and (v != v or 0 <= v <= 100)) for v in acc)
    if not ok:
        raise InputError(f"{where}: methods.{method}.per_class_acc must be a list of per-class accuracies "
                         f"(percent, 0 to 100, or null), got {display_text(repr(acc))[:80]}")
    return np.array([np.nan if v is None else v for v in acc], dtype=float)


def vs2_changes(results: dict[str, Any] | None, classnames: list[str] | None, n_classes: int | None,
                notes: list[str], where: str = "results", at_least: bool = False) -> VS2Changes | None:
    """The per-class changes, or None with the reason in `notes` (no VS2 rows, other classes).

    `n_classes`: the cache's class count when known; per-class accuracies of another length (with
    `at_least`, when only the largest cached label is known: fewer entries) are a user error
    (`InputError`), not a crash."""
    if results is None:
        return None
    methods = results["methods"]
    label = next((m for m in ("vs2", "vs2_pass") if m in methods), None) or \
        next((m for m in methods if m.startswith("vs2") and "pp" not in m), None)
    if label is None or "zeroshot" not in methods:
        notes.append("The results file has no zeroshot and VS2 rows; VS2 per-class changes are left out.")
        return None
    names = results.get("classnames")
    if classnames is not None and isinstance(names, list) and list(names) != list(classnames):
        notes.append("The results file's classes differ from the cache's; VS2 per-class changes are left out.")
        return None
    vs2, zs = _accuracies(results, label, where), _accuracies(results, "zeroshot", where)
    want = n_classes if n_classes is not None else (len(names) if isinstance(names, list) else len(zs))
    if at_least and n_classes is not None and len(zs) >= n_classes:
        want = len(zs)
    for m, a in ((label, vs2), ("zeroshot", zs)):
        if len(a) != want:
            has = f"labels up to {want - 1}" if at_least else f"{want} classes"
            raise InputError(f"{where}: methods.{m}.per_class_acc has {len(a)} entries, but the cache's data set "
                             f"has {has}; give the results.json of `vision-steer eval` on the same data set")
    counts, exact = _class_counts(results, want, where)
    se = None
    if counts is not None:
        p1, p0 = vs2 / 100, zs / 100
        with np.errstate(invalid="ignore", divide="ignore"):
            se = 100 * np.sqrt((p1 * (1 - p1) + p0 * (1 - p0)) / counts)
    return VS2Changes(label=label, delta_C=vs2 - zs, std_error_C=se, counts_C=counts, counts_exact=exact)


def _class_counts(results: dict[str, Any], n: int, where: str) -> tuple[np.ndarray | None, bool]:
    """Evaluation images per class: `class_counts` if recorded, else n_images / n_classes (balanced)."""
    counts = results.get("class_counts")
    if counts is not None:
        if not (isinstance(counts, list) and len(counts) == n and all(isinstance(c, int) and c >= 0 for c in counts)):
            raise InputError(f"{where}: class_counts must be {n} whole numbers, one per class")
        return np.array(counts, dtype=float), True
    n_images = (results.get("config") or {}).get("n_images") if isinstance(results.get("config"), dict) else None
    if isinstance(n_images, int) and n_images > 0 and n > 0:
        return np.full(n, n_images / n), False
    return None, False
