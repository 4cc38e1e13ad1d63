"""How a request differs from what is on disk: the one comparison behind every "made differently" refusal
(activation stores, SAE training runs, output folders, retrieval embeddings, text embeddings)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping


def request_differences(found: Mapping[str, Any], wanted: Mapping[str, Any], keys: Iterable[str] | None = None,
                        *, only_wanted: bool = False, skip: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """`(key, found value, wanted value)` for every key whose values differ: `keys` in their order, else every
    key of either side, sorted. `only_wanted`: compare only keys the request names. `skip`: keys never compared."""
    skipped = set(skip)
    names = list(keys) if keys is not None else sorted(set(found) | set(wanted))
    return [(k, found.get(k), wanted.get(k)) for k in names
            if k not in skipped and (not only_wanted or k in wanted) and found.get(k) != wanted.get(k)]


def describe_differences(diffs: Iterable[tuple[str, Any, Any]], found_label: str, *, max_len: int | None = None,
                         keep: int = 90) -> list[str]:
    """`"key: <found_label> has A, request has B"` per difference. When `max_len` is given and the two values'
    reprs are longer together (preprocessing reprs, say), each is cut to `keep` characters."""
    out = []
    for key, a, b in diffs:
        ra, rb = repr(a), repr(b)
        if max_len is not None and len(ra) + len(rb) > max_len:
            ra, rb = ra[:keep] + "...", rb[:keep] + "..."
        out.append(f"{key}: {found_label} has {ra}, request has {rb}")
    return out


__all__ = ["describe_differences", "request_differences"]
