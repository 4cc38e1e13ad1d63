"""Distributed caching and evaluation (issue 15, items 1, 2 and 5): 2 processes x 1 thread under torchrun
(gloo) against 1 process x 1 thread, side by side in one run.

ViT-B-32 (random weights, `--seed`) on the shared Tiny-ImageNet images. Each round runs, in alternating
order, the same `vision-steer cache` (and `vision-steer eval`) command once in one process and once under
`python -m torch.distributed.run --standalone --nproc_per_node 2`, with `OMP_NUM_THREADS=1` for every
process. Figures (speed: one process's time / two processes' time, median over rounds):

- `cache_2proc`: the `cache_activations` call as the command reports it ("time X s": decode, forward,
  shard writes, the gather and rank 0's finalising; not the interpreter start-up and model load);
- `cache_2proc_wall`: the whole command, start-up included;
- `eval_2proc`: `results.json` `timing.total_s` of rank 0 (text embeddings from a warm text cache,
  the backbone pass, the gathers, every method), and `eval_2proc_wall`.

CPU seconds are printed per run: of all processes of the command (`RUSAGE_CHILDREN`), and inside the
command of its busiest process (`_cli_cpu.py`: model load and work, no start-up). `cache_2proc_cpu` /
`eval_2proc_cpu` are one process's command CPU over the busiest rank's: the speed-up the split gives
when each process has a core to itself, which the shared machine's wall time may hide. After the timed
rounds the shard files of the two caches are compared byte for byte and the two `results.json`
(timings aside) for equality; a difference fails the script. `uptime`'s load is printed per round.

    python benchmarks/distributed.py                           # 1,024 images, 3 rounds
    python benchmarks/distributed.py --n-images 64 --reps 1    # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import TINY_IMAGENET_DIR, Figure, load_average, print_header, report, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, CPU s of every process it started, stdout) of one command; a failure stops the script."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def _shard_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.safetensors"))}


def _results(folder: Path) -> dict:
    res = json.loads((folder / "results.json").read_text())
    res.pop("timing")
    for row in res["methods"].values():
        row.pop("seconds")
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=1024, help="Tiny-ImageNet training images (evenly spaced)")
    p.add_argument("--n-eval-images", type=int, default=1000, help="Tiny-ImageNet val images for eval")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=64, help="rows per shard (CLS: one per image)")
    p.add_argument("--reps", type=int, default=3, help="rounds (each runs both variants of both commands)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    p.add_argument("--work-dir", type=Path, default=Path("/work/runs/bench/distributed"))
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    print_header("benchmarks/distributed.py", args)
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "VISION_STEER_TEXT_CACHE": str(work / "text")}

    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(args.seed)  # a random top-k SAE on ViT-B-32's final block (d_in 768)
    sae = TopKSAE(TopKSAEConfig(d_in=768, d_sae=3072, k=32))
    sae.cfg.metadata.hook_name = "blocks.11.hook_resid_post"
    sae.cfg.metadata.model_name = "ViT-B-32"
    sae.save_model(work / "sae")

    common = ["--model", "ViT-B-32", "--random-weights", "--seed", str(args.seed), "--device", "cpu",
              "--dataset", "tiny-imagenet", "--data-dir", str(args.data_dir), "--batch-size", str(args.batch_size),
              "--num-workers", "0", "--no-progress"]
    wrapper = str(Path(__file__).resolve().parent / "_cli_cpu.py")  # the CLI, logging each process's CPU s
    one = [sys.executable, wrapper]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", wrapper]
    cpu_log = work / "cpu.jsonl"
    env["CPU_LOG"] = str(cpu_log)

    def main_cpu() -> float:
        """The largest per-process CPU seconds inside the command (model load + work) of the last run."""
        lines = [json.loads(x) for x in cpu_log.read_text().splitlines()]
        cpu_log.unlink()
        return max(x["main_cpu_s"] for x in lines)

    def cache(launcher: list[str], name: str) -> list[str]:
        return [*launcher, "cache", *common, "--split", "train", "--limit", str(args.n_images), "--shard-size",
                str(args.shard_size), "--overwrite", "--out", str(work / name)]

    def evaluate(launcher: list[str], name: str) -> list[str]:
        return [*launcher, "eval", *common, "--split", "val", "--limit", str(args.n_eval_images), "--sae",
                str(work / "sae"), "--methods", "zeroshot,vs2,rec_final", "--templates", "single", "--no-plots",
                "--overwrite", "--out", str(work / name)]

    # warm-up (untimed): the text cache, the page cache of the images
    _run(evaluate(one, "eval_warm"), env)
    cpu_log.unlink(missing_ok=True)
    cpu_log.unlink(missing_ok=True)
    times: dict[str, list[float]] = {k: [] for k in ("c1", "c2", "c1w", "c2w", "c1c", "c2c", "e1", "e2", "e1w", "e2w",
                                                     "e1c", "e2c")}
    for r in range(args.reps):
        print(f"# round {r}: load average {load_average()}", flush=True)
        order = [("1", one), ("2", two)] if r % 2 == 0 else [("2", two), ("1", one)]
        for tag, launcher in order:
            wall, cpu, out = _run(cache(launcher, f"cache{tag}"), env)
            inner = float(re.search(r"^time ([\d.]+) s \(", out, re.M).group(1))
            times[f"c{tag}"].append(inner)
            times[f"c{tag}w"].append(wall)
            times[f"c{tag}c"].append(main_cpu())
            print(f"#   cache {tag} proc: caching {inner:.1f} s, command {wall:.1f} s wall, {cpu:.1f} s CPU (all "
                  f"processes), {times[f'c{tag}c'][-1]:.1f} s CPU in the busiest process's command", flush=True)
        for tag, launcher in order:
            wall, cpu, _ = _run(evaluate(launcher, f"eval{tag}"), env)
            inner = json.loads((work / f"eval{tag}" / "results.json").read_text())["timing"]["total_s"]
            times[f"e{tag}"].append(inner)
            times[f"e{tag}w"].append(wall)
            times[f"e{tag}c"].append(main_cpu())
            print(f"#   eval {tag} proc: evaluation {inner:.1f} s, command {wall:.1f} s wall, {cpu:.1f} s CPU (all "
                  f"processes), {times[f'e{tag}c'][-1]:.1f} s CPU in the busiest process's command", flush=True)
    print(f"# after: load average {load_average()}", flush=True)

    h1, h2 = _shard_hashes(work / "cache1"), _shard_hashes(work / "cache2")
    if not h1 or h1 != h2:
        raise SystemExit(f"the 2-process cache differs from the 1-process one: {sorted(set(h1.items()) ^ set(h2.items()))[:4]}")
    m1, m2 = (json.loads((work / f"cache{t}" / "metadata.json").read_text()) for t in "12")
    if m1["stats"] != m2["stats"] or m1["shards"] != m2["shards"]:
        raise SystemExit("the 2-process cache's statistics or shard records differ from the 1-process one")
    if _results(work / "eval1") != _results(work / "eval2"):
        raise SystemExit("the 2-process results.json differs from the 1-process one")
    print(f"# identical: {len(h1)} shard files byte for byte, statistics, results.json (timings aside)", flush=True)
    for name, a, b in (("cache_2proc", "c1", "c2"), ("cache_2proc_wall", "c1w", "c2w"), ("cache_2proc_cpu", "c1c", "c2c"),
                       ("eval_2proc", "e1", "e2"), ("eval_2proc_wall", "e1w", "e2w"), ("eval_2proc_cpu", "e1c", "e2c")):
        report(Figure(name, summarize(times[a]), summarize(times[b]), kind="speed", a_label="1 proc x 1 thread",
                      b_label="2 proc x 1 thread (torchrun, gloo)",
                      target=">= 1.8" if name in ("cache_2proc", "eval_2proc") else None),
               args.json_out)


if __name__ == "__main__":
    main()
