"""Shared helpers for the benchmark scripts: interleaved A/B timing, summary statistics, peak RSS of a
variant run in a fresh subprocess, a one-line machine description, and the figure line format.

Every figure is a ratio of two variants measured side by side in one run, because the machine is
shared and its speed drifts: variants run in alternating order (A B, B A, A B, ...), so slow phases
hit both, and each figure reports the median of each variant's times, the ratio of those medians,
the min-max spread of both, and the min-max of the per-round ratios.

Figure line (one per figure, grep-able):

    name: ratio (A median s, B median s, n runs) spread A min-max s, B min-max s, per-round B/A min-max [A=..., B=...]
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

# Where full-size runs keep their logs and caches (outside the repo).
DEFAULT_WORK_DIR = Path("/work/runs/bench")
TINY_IMAGENET_DIR = Path("/work/shared/datasets/tiny-imagenet-200")


# ---------------------------------------------------------------------------------- environment
def quiet_progress() -> None:
    """Silence tqdm bars (SAELens' trainer, our loaders) so logs stay one line per figure.

    tqdm reads TQDM_* variables when it is imported, so call this before importing torch/sae_lens.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")


def set_threads(n: int | None) -> int:
    """Hold torch's intra-op thread count fixed for every variant; returns the count in force."""
    import torch

    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def machine_line() -> str:
    """One line: CPU, cores, RAM, OS, Python/torch versions, torch threads, load average now."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    l1, l5, l15 = load_average()
    cores = os.cpu_count() or 0
    shared = " (shared: other jobs running)" if l1 > 0.5 * cores + 0.5 else ""
    return (f"machine: {cpu}, {cores} cores, {_mem_total_gib():.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}, load average {l1:.1f}/{l5:.1f}/{l15:.1f}{shared}")


def print_header(script: str, args: Any) -> None:
    settings = " ".join(f"--{k.replace('_', '-')}={v}" for k, v in sorted(vars(args).items()) if not k.startswith("_"))
    print(f"# {script} {settings}", flush=True)
    print(f"# {machine_line()}", flush=True)


# ---------------------------------------------------------------------------------- timing
Fn = Callable[[], "float | None"]


@dataclass
class Timings:
    """Per-variant lists of wall seconds and of this process's CPU seconds (`time.process_time`: all
    its threads, not DataLoader worker processes), one entry per timed round."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def __getitem__(self, name: str) -> list[float]:
        return self.wall[name]


def interleave(variants: Mapping[str, Fn], reps: int, warmup: int = 1,
               on_round: Callable[[int, dict[str, float]], None] | None = None) -> Timings:
    """Time each variant `reps` times, interleaved, after `warmup` untimed calls of each.

    Rounds alternate the order (A B C, C B A, A B C, ...) so that a drift in machine speed does not
    always favour the same variant. A variant may return its own measured seconds as a float (e.g. the
    fit time a function reports); otherwise (None or any other object) its wall time
    (`time.perf_counter`) is taken.
    """
    if reps < 1:
        raise ValueError("reps must be >= 1")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    out = Timings({n: [] for n in names}, {n: [] for n in names})
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        this_round = {}
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            reported = variants[name]()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            this_round[name] = float(reported) if isinstance(reported, (int, float)) else elapsed
            out.wall[name].append(this_round[name])
            out.cpu[name].append(cpu)
        if on_round is not None:
            on_round(r, this_round)
    return out


@dataclass(frozen=True)
class Summary:
    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    @property
    def n(self) -> int:
        return len(self.values)


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no measurements")
    return Summary(tuple(float(v) for v in values))


@dataclass(frozen=True)
class Figure:
    """A ratio of two variants' measurements, from interleaved rounds.

    `kind="time"`: B/A (for times: overhead, lower is better; also used for other quantities such as
    peak RSS in MiB, with `unit`); `kind="speed"`: A/B per round = B's throughput over A's (higher is
    better). The figure is the median of the per-round ratios (each round runs A and B back to back, so
    a slow phase of the shared machine cancels out); the ratio of the two medians is printed as well.
    """

    name: str
    a: Summary
    b: Summary
    kind: Literal["time", "speed"] = "time"
    a_label: str = "A"
    b_label: str = "B"
    target: str | None = None  # e.g. "<= 1.01"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    unit: str = "s"

    @property
    def paired(self) -> Summary:
        if self.a.n != self.b.n:
            raise ValueError(f"{self.name}: {self.a.n} A runs but {self.b.n} B runs")
        pairs = zip(self.a.values, self.b.values)
        return summarize([b / a if self.kind == "time" else a / b for a, b in pairs])

    @property
    def ratio(self) -> float:
        return self.paired.median

    @property
    def ratio_of_medians(self) -> float:
        return self.b.median / self.a.median if self.kind == "time" else self.a.median / self.b.median

    def met(self) -> bool | None:
        if not self.target:
            return None
        op, value = self.target.split()
        v = float(value)
        return {"<=": self.ratio <= v, ">=": self.ratio >= v, "<": self.ratio < v, ">": self.ratio > v}[op]

    def line(self) -> str:
        what = {"time": "B/A time", "speed": "B/A throughput"}[self.kind] if self.unit == "s" else "B/A"
        u = self.unit
        p = self.paired
        verdict = f" target {self.target}: {'met' if self.met() else 'MISSED'}" if self.target else ""
        note = f" {self.note}" if self.note else ""
        return (f"{self.name}: {self.ratio:.4f} (A {self.a.median:.4g} {u}, B {self.b.median:.4g} {u}, n={self.a.n}) "
                f"spread A {self.a.min:.4g}-{self.a.max:.4g} {u}, B {self.b.min:.4g}-{self.b.max:.4g} {u}, "
                f"per-round {what} {p.min:.4f}-{p.max:.4f} (figure = their median; ratio of medians "
                f"{self.ratio_of_medians:.4f}){verdict} [A={self.a_label}, B={self.b_label}]{note}")

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, "name": self.name, "ratio": self.ratio, "ratio_of_medians": self.ratio_of_medians,
                "kind": self.kind, "unit": self.unit, "a_label": self.a_label, "b_label": self.b_label,
                "a": list(self.a.values), "b": list(self.b.values), "target": self.target, "met": self.met(),
                "note": self.note}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Figure":
        known = {"name", "ratio", "ratio_of_medians", "kind", "unit", "a_label", "b_label", "a", "b", "a_s", "b_s",
                 "target", "met", "note", "time"}
        return cls(d["name"], summarize(d.get("a", d.get("a_s"))), summarize(d.get("b", d.get("b_s"))),
                   d.get("kind", "time"), d.get("a_label", "A"), d.get("b_label", "B"), d.get("target"),
                   d.get("note", ""), {k: v for k, v in d.items() if k not in known}, d.get("unit", "s"))


def report(fig: Figure, json_out: Path | None = None) -> Figure:
    print(fig.line(), flush=True)
    if json_out is not None:
        append_json(json_out, fig.to_json())
    return fig


def append_json(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON object per line (a machine-readable copy of the printed figures)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **obj}) + "\n")


# ---------------------------------------------------------------------------------- peak RSS
def _maxrss_mib(who: int) -> float:
    per_mib = 2**20 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(who).ru_maxrss / per_mib


def child_rss() -> dict[str, float]:
    """Inside a measured child: its own peak RSS and the largest of its finished children (workers)."""
    return {"self_peak_mib": _maxrss_mib(resource.RUSAGE_SELF),
            "children_peak_mib": _maxrss_mib(resource.RUSAGE_CHILDREN)}


def write_child_result(path: str | Path, result: dict[str, Any]) -> None:
    """Called by the child at the end: its result and its RSS figures, written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**result, **child_rss()}))
    os.replace(tmp, path)


def run_measured_child(argv: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run `python argv... --result-file F` in a fresh process, so that `ru_maxrss` is this variant's alone.

    Returns the child's JSON result plus `wait4_peak_mib`: the kernel's peak RSS for the child and the
    descendants it waited for (the larger of the main process and any DataLoader worker).
    The child's stdout/stderr go to ours (the log).
    """
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, *argv, "--result-file", str(result_file)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd)
        try:
            if timeout is None:
                _, status, usage = os.wait4(proc.pid, 0)
            else:
                deadline = time.monotonic() + timeout
                while True:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.monotonic() > deadline:
                        proc.kill()
                        raise TimeoutError(f"{' '.join(cmd)} ran longer than {timeout} s")
                    time.sleep(0.2)
        finally:
            proc.returncode = 0  # reaped by wait4; keep Popen from waiting again
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"measured child failed with exit code {code}: {' '.join(cmd)}")
        result = json.loads(result_file.read_text())
    per_mib = 2**20 if sys.platform == "darwin" else 1024
    result["wait4_peak_mib"] = usage.ru_maxrss / per_mib
    result["child_wall_s"] = time.perf_counter() - t0
    return result


def reprint(jsonl: Path) -> None:
    """Print the figure lines of a `--json-out` file again (with this module's current format)."""
    for line in Path(jsonl).read_text().splitlines():
        if line.strip():
            print(Figure.from_json(json.loads(line)).line())


if __name__ == "__main__":  # python benchmarks/_timing.py results.jsonl
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/_timing.py RESULTS.jsonl   (re-print the figure lines)")
    reprint(Path(sys.argv[1]))
