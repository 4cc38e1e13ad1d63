"""CPU time of `vision-steer --help` (a fresh interpreter, as a user runs it) / CPU time of
`python -c "import torch"`, side by side in one run, alternated; plus `import sae_lens_vision_steer`.
The CPU seconds of each child process come from `resource.getrusage(RUSAGE_CHILDREN)` deltas.

    python benchmarks/cli_startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys


def child_cpu(cmd: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    exe = shutil.which("vision-steer")
    variants = {
        "help": [exe, "--help"] if exe else [sys.executable, "-m", "sae_lens_vision_steer", "--help"],
        "import_package": [sys.executable, "-c", "import sae_lens_vision_steer"],
        "import_torch": [sys.executable, "-c", "import torch"],
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # alternate the order
            times[name].append(child_cpu(variants[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"load average {os.getloadavg()[0]:.2f}; medians over {args.rounds} rounds, CPU seconds")
    for k, v in med.items():
        print(f"{k:>15}: {v:.3f} s")
    print(f"vision-steer --help / import torch: {med['help'] / med['import_torch']:.3f}  (target <= 1.2)")
    print(f"import sae_lens_vision_steer / import torch: {med['import_package'] / med['import_torch']:.3f}")


if __name__ == "__main__":
    main()
