"""Running under `torchrun` (or `accelerate launch`, which sets the same environment): the process
group, this rank's device, and the few collectives the cache writer and the evaluation runner use.

`torch.distributed` does the work; this module only wraps what every caller would repeat:

- `launched()` / `init(device)`: read `RANK`, `WORLD_SIZE`, `LOCAL_RANK` and start the process group
  (`gloo` on CPU, `nccl` on CUDA, each rank on `cuda:LOCAL_RANK`); `shutdown()` ends it.
- `rank()`, `world_size()`, `is_main()`: 0, 1 and True when no group is running, so callers need no
  special case for one process.
- `check_same(what, fields)`: every rank sends its request fingerprint; a difference is refused on
  every rank, naming the field, the ranks and their values (`RankMismatchError`).
- `on_main(fn)`: rank 0 runs `fn` (folder set-up, a lock, finalising); its result, or its error, reaches
  every rank, so a refusal ends all ranks with the same message instead of leaving them waiting.
- `same_folder(what, path)` / `exclusive_folder(path, what, error)`: before any work, every rank must
  name the same output folder (resolved); for a folder every rank writes into (a cache), rank 0 takes
  its lock and every rank checks that it sees that very lock (ranks on machines without a shared
  folder are refused too), so no rank writes into a folder whose lock and metadata it did not check.
- `batch_block(n, batch_size)`, `data.shard_loader(...)`: this rank's contiguous block of the fixed batch grid
  `[0, B), [B, 2B), ...`, so every batch has the composition it has in one process (identical bytes).
- `gather_cat(tensors)`: concatenate per-rank tensors in rank order (= data-set order).

A rank that dies makes torchrun's elastic agent stop the others; writes are atomic, so nothing partial
is recorded and a rerun resumes. `VISION_STEER_DIST_TIMEOUT_S` (default 3 h) bounds a collective wait
(e.g. while rank 0 trains the SAE in `vision-steer run`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .errors import ConflictError, UsageError
from .fileio import LOCK_FILE, exclusive_writer

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_S = 3 * 3600


class RankMismatchError(UsageError):
    """The ranks of one launch were given different requests (model, hooks, data set, ...)."""


class PeerError(RuntimeError):
    """Raised on the other ranks when rank 0 failed with an error that cannot be re-raised as is."""


def launched() -> bool:
    """True in a process started by torchrun / accelerate with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str = "cpu") -> str:
    """Start the process group from the launcher's environment; return this rank's device.

    `device` is the one asked for (`cpu`, `cuda`, `cuda:N` is refused: each rank takes `cuda:LOCAL_RANK`).
    Does nothing (and returns `device`) outside a multi-process launch or when a group is running."""
    if not launched() or dist.is_initialized():
        return device
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} are not: launch with torchrun or accelerate launch")
    local_rank = int(os.environ["LOCAL_RANK"])
    timeout = datetime.timedelta(seconds=float(os.environ.get("VISION_STEER_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            raise UsageError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; give --device cuda")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device(device))
    elif dev.type == "cpu":
        dist.init_process_group("gloo", timeout=timeout)
    else:
        raise UsageError(f"--device {device}: distributed runs use cpu (gloo) or cuda (nccl)")
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]` (`[obj]` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same(what: str, fields: dict[str, Any]) -> None:
    """Refuse (on every rank) when the ranks' `fields` differ, naming each field, the ranks and values."""
    if not active():
        return
    everyone = all_gather_object(fields)
    diffs = []
    for key in sorted(set().union(*everyone)):
        values = [f.get(key) for f in everyone]
        if any(v != values[0] for v in values):
            groups: dict[str, list[int]] = {}
            for r, v in enumerate(values):
                groups.setdefault(_short(v), []).append(r)
            diffs.append(f"{key}: " + ", ".join(f"rank{'s' if len(rs) > 1 else ''} {_ranks(rs)} ha"
                                                f"{'ve' if len(rs) > 1 else 's'} {v}" for v, rs in groups.items()))
    if diffs:
        err = RankMismatchError(f"the {world_size()} ranks were given different {what}s ({'; '.join(diffs)}); "
                                "every rank must run the same command on the same model and data")
        err.reported_by_main = not is_main()  # every rank raises it; the command line prints it once
        raise err


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _ranks(rs: list[int]) -> str:
    return ",".join(map(str, rs))


def on_main(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only; every rank gets its result, or raises its error.

    On the other ranks the error is re-raised with `reported_by_main = True`, so that the command line
    prints it once (from rank 0)."""
    if not active():
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as e:  # sent to the other ranks, then raised here too
            outcome = ("error", e)
    try:
        outcome = broadcast_object(outcome)
    except Exception:  # an unpicklable result or error
        if is_main() and outcome[0] == "error":
            raise outcome[1] from None
        raise
    kind, value = outcome
    if kind == "error":
        if not is_main():
            try:
                value.reported_by_main = True
            except AttributeError:
                value = PeerError(f"rank 0 failed: {value}")
                value.reported_by_main = True
        raise value
    return value


def same_folder(what: str, path: str | Path) -> Path:
    """`path` resolved; refused on every rank (`RankMismatchError`) unless every rank names the same folder."""
    resolved = Path(path).resolve()
    check_same(what, {"folder": str(resolved)})
    return resolved


@contextlib.contextmanager
def exclusive_folder(path: str | Path, what: str, error: type[Exception] = ConflictError) -> Iterator[Path]:
    """The folder every rank writes into (e.g. a cache), agreed and locked before any work:

    every rank names the same folder (`same_folder`); rank 0 creates it and takes its lock (`error`
    when another process holds it, raised on every rank); then each rank checks that it sees rank 0's
    lock in its own view of the folder (`ConflictError` naming the ranks otherwise: e.g. ranks on
    machines that do not share the folder). In one process: the lock alone. Yields the resolved path."""
    resolved = same_folder(f"{what} folder", path)
    with contextlib.ExitStack() as stack:
        def take() -> str:
            resolved.mkdir(parents=True, exist_ok=True)
            return stack.enter_context(exclusive_writer(resolved, what, error))

        token = on_main(take)
        if active() and token:  # (no token: no flock on this system, so no lock to see)
            try:
                seen = (resolved / LOCK_FILE).read_text(errors="replace").strip()
            except OSError:
                seen = None
            blind = [r for r, ok in enumerate(all_gather_object(seen == token)) if not ok]
            if blind:
                err = ConflictError(
                    f"rank{'s' if len(blind) > 1 else ''} {_ranks(blind)} cannot see the lock rank 0 holds on the "
                    f"{what} folder {resolved} (a folder of the same name on another machine?); every rank must "
                    "write into the one folder: give a folder every rank shares")
                err.reported_by_main = not is_main()
                raise err
        yield resolved


# ---------------------------------------------------------------------------------- splitting work
def split_contiguous(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """`items` cut into `parts` contiguous runs whose lengths differ by at most one (earlier ones longer)."""
    n, out, start = len(items), [], 0
    for p in range(parts):
        size = n // parts + (1 if p < n % parts else 0)
        out.append(list(items[start:start + size]))
        start += size
    return out


def batch_block(n_items: int, batch_size: int) -> list[list[int]]:
    """This rank's contiguous block of the fixed batch grid over `range(n_items)` (all of it in one process)."""
    grid = [list(range(b, min(b + batch_size, n_items))) for b in range(0, n_items, batch_size)]
    return split_contiguous(grid, world_size())[rank()]


def gather_cat(tensors: Sequence[torch.Tensor | None], device: str | torch.device | None = None) -> list[Any]:
    """Each tensor concatenated over ranks in rank order (through the CPU). A rank with nothing to send
    gives None; an entry is None only when every rank gave None."""
    if not active():
        return list(tensors)
    everyone = all_gather_object([None if t is None else t.cpu() for t in tensors])
    out = []
    for i in range(len(tensors)):
        parts = [e[i] for e in everyone if e[i] is not None]
        out.append(torch.cat(parts).to(device) if parts and device is not None else (torch.cat(parts) if parts else None))
    return out


def sum_int(value: int) -> int:
    return int(sum(all_gather_object(int(value))))


__all__ = [
    "DEFAULT_TIMEOUT_S", "PeerError", "RankMismatchError", "active", "all_gather_object", "barrier", "batch_block",
    "broadcast_object", "check_same", "exclusive_folder", "gather_cat", "init", "is_main", "launched", "on_main", "rank",
    "same_folder", "shutdown", "split_contiguous", "sum_int", "world_size",
]
