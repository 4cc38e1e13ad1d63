"""Several `vision-steer` commands in one process group (one launch pays the start-up once), for
tests/test_distributed.py: under torchrun (`torchrun ... tests/dist_worker.py PLAN.json`), or forked
from the test process by `launch_forked` (no second import of torch and the package: seconds, not tens).

PLAN.json: {"out": DIR, "steps": [{"argv": [...], "rank_argv": {"1": [...]}, "kill_after_shards": {"1": 1}}]}
- `rank_argv`: extra arguments for one rank (ranks that disagree on the request);
- `kill_after_shards`: that rank SIGKILLs itself once it has recorded that many shards (a rank dying mid-run).
Each rank writes DIR/rank<r>.json after every step: the return code, what the step wrote to stderr, and
the size of every image batch its image tower was given.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from contextlib import redirect_stderr
from pathlib import Path

import torch

from sae_lens_vision_steer.activation_cache import sharded
from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.core import distributed


def kill_after(n: int) -> None:
    """Fault injection: this process dies (SIGKILL, no clean-up) right after recording its n-th shard."""
    original = sharded.write_json_atomic
    seen = {"n": 0}

    def write(path, obj, *a, **kw):
        out = original(path, obj, *a, **kw)
        if Path(path).name.startswith("progress_rank"):
            seen["n"] += 1
            if seen["n"] >= n:
                os.kill(os.getpid(), signal.SIGKILL)
        return out

    sharded.write_json_atomic = write


def log_batches() -> list[int]:
    """Instrumentation: the size of every image batch the image tower's forward gets (cache and eval)."""
    from sae_lens_vision_steer.sae.splice import HookedCLIP

    sizes: list[int] = []
    original = HookedCLIP.forward

    def forward(self, x, *a, **kw):
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            sizes.append(len(x))
        return original(self, x, *a, **kw)

    HookedCLIP.forward = forward
    return sizes


def run(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    distributed.init("cpu")  # one group for every step (main() leaves a group it did not start alone)
    rank = str(distributed.rank())
    report = Path(plan["out"]) / f"rank{rank}.json"
    done = []
    batches = log_batches()
    for step in plan["steps"]:
        batches.clear()
        if rank in step.get("kill_after_shards", {}):
            kill_after(step["kill_after_shards"][rank])
        err = io.StringIO()
        with redirect_stderr(err):
            rc = main(step["argv"] + step.get("rank_argv", {}).get(rank, []))
        done.append({"rc": rc, "stderr": err.getvalue(), "batches": list(batches)})
        report.write_text(json.dumps(done))
    distributed.shutdown()


def _forked_rank(rank: int, world: int, port: int, plan_path: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = 0
    try:
        run(plan_path)
    except BaseException:  # e.g. a collective whose peer died
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never run the parent's (pytest's) exit handlers in a forked child


def launch_forked(plan_path: str | Path, nproc: int = 2, timeout: float = 300) -> list[int | None]:
    """Fork `nproc` ranks (env:// rendezvous on a free local port) and, like torchrun's agent, stop the
    others when one fails. Returns each rank's exit code (negative: killed by that signal)."""
    import multiprocessing as mp
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_forked_rank, args=(r, nproc, port, str(plan_path))) for r in range(nproc)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                if p.exitcode is None:
                    p.terminate()  # SIGTERM, as torchrun's agent does
        time.sleep(0.05)
    for p in procs:
        if p.exitcode is None:
            p.kill()
        p.join()
    return [p.exitcode for p in procs]


if __name__ == "__main__":
    run(sys.argv[1])
