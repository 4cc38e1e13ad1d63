"""SAE training from a patch-token cache that does not fit in the memory left to it (issue 15, item 4).

A patch cache (every token, `positions="all"`, of a one-block 768-wide tower on 224 px images with
16 px patches: 197 rows of 768 float16 per image, the real format, written by `cache_activations`
from Tiny-ImageNet training images) at two sizes, X and 2X images. Each measurement runs in a fresh
process; with `--cap-mib` (default) that process runs in a cgroup-v1 memory group whose
`memory.limit_in_bytes` (which counts the page cache as well as RSS) is below the 2X cache's size
(both sizes are trained under the same cap).

Figures (side by side in one run):

  train    SAETrainer (top-k 768x3072, k=64, batch 256, configured as `train_sae` does) fed by
           `train_sae`'s loader (`activation_batches`, as `train_sae` calls it) from the 2X cache, under the cap:
           loader samples/s (its worker's own time) / trainer samples/s; target >= 1.5
  rss      peak RSS of the same training from the X and the 2X cache: 2X / X; target < 1.10 (flat)
  loader   the loader alone over `--loader-rows` of the 2X cache (no cap, cold start): sequential (shards in order,
           checked and converted to float32) and shuffled (`activation_batches`, in-process and
           prefetched in SAELens' `PrefetchingIterator`) samples/s

Before each measured run the cache's files are evicted from the page cache (`posix_fadvise(DONTNEED)`
per file; `/proc/sys/vm/drop_caches` is not writable here), so runs start cold; `/proc/self/io`
`read_bytes` (bytes the process really fetched from the disk) is reported next to the bytes read. The
cap counts RSS and page cache together; the training process itself needs about 1.2 GiB, so with a
1.5 GiB cap only a few hundred MiB of the cache's pages can stay cached and rereads go to the disk.

    python benchmarks/patch_loader.py        # X = 1,750 images (0.5 GiB), 2X = 3,500 (1.0 GiB), cap 1.5 GiB
    python benchmarks/patch_loader.py --n-images 200 --cap-mib 0 --samples 20480 --reps 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    TINY_IMAGENET_DIR, Figure, child_rss, load_average, print_header, quiet_progress, report, set_threads, summarize,
    write_child_result,
)

quiet_progress()

from _setup import add_common_args, tiny_imagenet  # noqa: E402

# mlp_ratio 0.5: the forward costs less per row (the caches are built faster); the rows are 768 wide as ViT-B's.
PATCH_TOWER = dict(embed_dim=512, vision_cfg=dict(image_size=224, patch_size=16, width=768, layers=1, head_width=64,
                                                  mlp_ratio=0.5),
                   text_cfg=dict(context_length=77, width=64, heads=2, layers=1))
HOOK = "blocks.0.hook_resid_post"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def _disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return -1


def _cache_dir(args, n_images: int) -> Path:
    return args.work_dir / f"patch_cache_{n_images}"


def drop_file_pages(folder: Path) -> None:
    """Evict the cache's files from the page cache (`posix_fadvise(DONTNEED)` on each: clean pages of
    those files only), so that a measurement starts cold. `/proc/sys/vm/drop_caches` is not writable here."""
    for f in sorted(folder.iterdir()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------- children
def child_build(args) -> dict:
    import torch

    from sae_lens_vision_steer import HookedCLIP
    from sae_lens_vision_steer.activation_cache import cache_activations

    torch.manual_seed(args.seed)
    model = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, **PATCH_TOWER).eval().requires_grad_(False)
    ds = tiny_imagenet("train", args.n_images, model.preprocess, args.data_dir)
    t0 = time.perf_counter()
    cache = cache_activations(model, ds, HOOK, _cache_dir(args, args.n_images), positions="all", batch_size=64,
                              num_workers=args.num_workers, show_progress=False)
    return {"n_rows": cache.n_rows, "seconds": time.perf_counter() - t0}


def child_train(args) -> dict:
    """SAETrainer configured as `train_sae` configures it, fed by `train_sae`'s loader.

    Not `train_sae` itself: its closing evaluation encodes every training row once (an epoch of SAE
    forwards, minutes on this CPU for a patch cache), which is not what this figure measures."""
    import torch
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class

    from sae_lens_vision_steer.activation_cache import ActivationStore
    from sae_lens_vision_steer.training.batches import LoaderStats, activation_batches, holdout_split

    cache = ActivationStore.open(_cache_dir(args, args.n_images))
    io0 = _disk_read_bytes()
    train_rows, _ = holdout_split(cache, 0.1, 0)
    d_in, batch = cache.d_in(HOOK), 256
    n_steps = args.samples // batch
    sae_cls, cfg_cls = get_sae_training_class("topk")
    torch.manual_seed(args.seed)
    sae = sae_cls(cfg_cls(d_in=d_in, d_sae=4 * d_in, k=64, dtype="float32", device="cpu", apply_b_dec_to_input=True,
                          normalize_activations="none", decoder_init_norm=1.0, aux_loss_coefficient=1.0,
                          rescale_acts_by_decoder_norm=True))
    cfg = SAETrainerConfig(total_training_samples=n_steps * batch, train_batch_size_samples=batch, lr=5e-4, lr_end=5e-4,
                           lr_scheduler_name="constant", lr_warm_up_steps=max(1, n_steps // 20),
                           lr_decay_steps=n_steps - max(1, n_steps // 20), device="cpu", dead_feature_window=100,
                           feature_sampling_window=max(n_steps + 1, 2000), n_checkpoints=0, checkpoint_path=None,
                           save_final_checkpoint=False, logger=LoggingConfig(log_to_wandb=False))
    stats = LoaderStats()
    batches = activation_batches(cache, HOOK, batch, rows=train_rows, seed=args.seed, stats=stats)
    t0 = time.perf_counter()
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches).fit()
    fit = time.perf_counter() - t0
    batches.close()
    return {"n_rows": cache.n_rows, "cache_bytes": sum(r["nbytes"] for r in cache.metadata["shards"]),
            "train_sps": n_steps * batch / fit, "loader_sps": stats.samples_per_second,
            "loader_wait_s": stats.wait_seconds, "fit_s": fit, "disk_read_bytes": _disk_read_bytes() - io0}


def child_loader(args) -> dict:
    from sae_lens_vision_steer.activation_cache import ActivationStore
    from sae_lens_vision_steer.training.batches import LoaderStats, activation_batches

    cache = ActivationStore.open(_cache_dir(args, args.n_images))
    out = {"n_rows": cache.n_rows, "cache_bytes": sum(r["nbytes"] for r in cache.metadata["shards"])}
    limit = min(args.loader_rows, cache.n_rows)
    for name in ("sequential", "shuffled", "shuffled_prefetch"):
        io0, t0 = _disk_read_bytes(), time.perf_counter()
        n = 0
        if name == "sequential":
            for acts in cache.iter_shards(HOOK):
                n += len(acts)
                if n >= limit:
                    break
        else:
            stats = LoaderStats()
            batches = activation_batches(cache, HOOK, 256, seed=args.seed, epochs=1,
                                         prefetch=4 if name == "shuffled_prefetch" else 0, stats=stats)
            for batch in batches:
                n += len(batch)
                if n >= limit:
                    break
            batches.close()
        dt = time.perf_counter() - t0
        out[name] = {"samples": n, "seconds": dt, "sps": n / dt, "disk_read_bytes": _disk_read_bytes() - io0}
    return out


# ---------------------------------------------------------------------------------- parent
class MemoryCap:
    """A cgroup-v1 memory group (RSS + page cache) that measured children join; None when unavailable."""

    def __init__(self, mib: int):
        self.path = CGROUP_ROOT / f"patch_loader_{os.getpid()}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(mib * 2**20))
        try:
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(mib * 2**20))
        except OSError:
            pass  # no swap accounting (and no swap on this machine)
        self.mib = mib

    def peak_mib(self) -> float:
        return int((self.path / "memory.max_usage_in_bytes").read_text()) / 2**20

    def reset_peak(self) -> None:
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    def failcnt(self) -> int:
        return int((self.path / "memory.failcnt").read_text())

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def run_child(args, mode: str, n_images: int, cap: MemoryCap | None) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="patch_loader_") as tmp:
        result = Path(tmp) / "r.json"
        argv = [sys.executable, __file__, "--child", mode, "--n-images", str(n_images), "--samples", str(args.samples),
                "--loader-rows", str(args.loader_rows),
                "--work-dir", str(args.work_dir), "--data-dir", str(args.data_dir), "--seed", str(args.seed),
                "--num-workers", str(args.num_workers), "--result-file", str(result)]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        if args.cold:
            drop_file_pages(_cache_dir(args, n_images))
        if cap is not None:  # join the memory group before Python starts
            cap.reset_peak()
            argv = ["sh", "-c", f'echo $$ > {cap.path}/cgroup.procs && exec "$@"', "sh", *argv]
        subprocess.run(argv, check=True)
        out = json.loads(result.read_text())
    if cap is not None:
        out["cgroup_peak_mib"], out["cgroup_failcnt"] = cap.peak_mib(), cap.failcnt()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=1750, help="images in the X cache (2X has twice as many)")
    p.add_argument("--samples", type=int, default=256 * 40, help="training samples per training run")
    p.add_argument("--loader-rows", type=int, default=800_000, help="rows each loader-alone pass reads (at most all)")
    p.add_argument("--cap-mib", type=int, default=1536, help="memory cap (cgroup, RSS + page cache); 0: none")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers when building the caches")
    p.add_argument("--no-cold", dest="cold", action="store_false",
                   help="do not evict the cache files from the page cache before each measured run")
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    p.add_argument("--child", choices=["build", "train", "loader"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    add_common_args(p, reps=2, warmup=0)
    args = p.parse_args(argv)
    args.work_dir = Path(args.work_dir)
    if args.child:
        set_threads(args.threads)
        res = {"build": child_build, "train": child_train, "loader": child_loader}[args.child](args)
        write_child_result(args.result_file, {**res, **child_rss()})
        return

    set_threads(args.threads)
    print_header("patch_loader", args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    sizes = (args.n_images, 2 * args.n_images)
    for n in sizes:  # built once (outside the cap), then reused
        if not (_cache_dir(args, n) / "labels.npy").is_file():
            r = run_child(args, "build", n, None)
            print(f"# built {_cache_dir(args, n)}: {r['n_rows']} rows in {r['seconds']:.0f} s", flush=True)
    cap = None
    if args.cap_mib:
        try:
            cap = MemoryCap(args.cap_mib)
        except OSError as e:
            print(f"# no cgroup memory cap ({e}); peak RSS is measured instead", flush=True)
    try:
        rss = {n: [] for n in sizes}
        trains, loaders = [], []
        for r in range(args.reps):  # alternate X / 2X so that a slow phase of the machine hits both
            for n in (sizes if r % 2 == 0 else sizes[::-1]):
                t = run_child(args, "train", n, cap)
                rss[n].append(t["self_peak_mib"])
                print(f"# train n_images={n} rows={t['n_rows']} cache {t['cache_bytes'] / 2**30:.2f} GiB: "
                      f"{json.dumps({k: v for k, v in t.items() if k not in ('n_rows', 'cache_bytes')})} "
                      f"load {load_average()[0]:.1f}", flush=True)
                if n == sizes[1]:
                    trains.append(t)
            lo = run_child(args, "loader", sizes[1], None)  # three passes in one process: more than the cap holds
            loaders.append(lo)
            print(f"# loader rows={lo['n_rows']} cache {lo['cache_bytes'] / 2**30:.2f} GiB: "
                  f"{json.dumps({k: lo[k] for k in ('sequential', 'shuffled', 'shuffled_prefetch')})} "
                  f"peak RSS {lo['self_peak_mib']:.0f} MiB, worker {lo['children_peak_mib']:.0f} MiB, "
                  f"cgroup peak {lo.get('cgroup_peak_mib', float('nan')):.0f} MiB, load {load_average()[0]:.1f}",
                  flush=True)
    finally:
        if cap is not None:
            cap.close()
    big = trains[0]
    capped = (f"under a {args.cap_mib} MiB cgroup cap (RSS + page cache) for a {big['cache_bytes'] / 2**20:.0f} MiB "
              f"cache" if cap else "no cap")
    # speed kind: A/B = (1/loader)/(1/trainer) = loader / trainer throughput, as seconds per sample
    report(Figure("patch_loader/loader_over_trainer", summarize([1 / t["train_sps"] for t in trains]),
                  summarize([1 / t["loader_sps"] for t in trains]), "speed", "trainer (SAETrainer)",
                  "loader (activation_batches worker, its own time)", ">= 1.5",
                  f"{capped}; trainer waited {summarize([t['loader_wait_s'] for t in trains]).median:.2f} s of "
                  f"{summarize([t['fit_s'] for t in trains]).median:.1f} s fit; disk reads "
                  f"{summarize([t['disk_read_bytes'] for t in trains]).median / 2**20:.0f} MiB", unit="s/sample"),
           args.json_out)
    report(Figure("patch_loader/peak_rss_2x_over_x", summarize(rss[sizes[0]]), summarize(rss[sizes[1]]), "time",
                  f"training from the X cache ({sizes[0]} images)", f"from the 2X cache ({sizes[1]} images)", "< 1.10",
                  "main process ru_maxrss (the loader worker is a child; its peak is printed above)", unit="MiB"),
           args.json_out)
    seq = summarize([lo["sequential"]["sps"] for lo in loaders])
    for name in ("shuffled", "shuffled_prefetch"):
        sh = summarize([lo[name]["sps"] for lo in loaders])
        report(Figure(f"patch_loader/{name}_over_sequential", summarize([1 / v for v in seq.values]),
                      summarize([1 / v for v in sh.values]), "speed", "sequential shard reads", name, None,
                      f"no cap, cache files evicted from the page cache first; samples/s median sequential "
                      f"{seq.median:.0f}, {name} {sh.median:.0f} (saev: 4.5k "
                      f"sequential, 5.8k shuffled); disk reads per pass "
                      f"{summarize([lo[name]['disk_read_bytes'] for lo in loaders]).median / 2**20:.0f} MiB of "
                      f"{loaders[0]['cache_bytes'] / 2**20:.0f} MiB", unit="s/sample"), args.json_out)


if __name__ == "__main__":
    main()
