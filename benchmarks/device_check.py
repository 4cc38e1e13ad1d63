"""Device check (issue 21, item 4): caching, SAE training and evaluation throughput on one accelerator.

Run by `benchmarks/device_check.sh` on a GPU machine (about 5 minutes on one H200 with the defaults);
`--tiny` runs every step at toy sizes on the CPU (the test suite does, end to end). Random weights
everywhere, synthetic images (written as JPEG files by the script), no data set and no download needed.

Figures, one line each (`device_check/<figure>: <value> <unit> (details)`), and all of them in `--json-out`:

  <model>/forward_ceiling   images/s of `run_with_cache` (final block) on a batch already on the device
  <model>/cache_decoded     images/s of `cache_activations` from decoded 224 px tensors in memory
  <model>/cache_jpeg        images/s of `cache_activations` from JPEG files (decode + preprocess in workers)
  sae/train_memory          samples/s of SAELens' `SAETrainer` fed from one tensor on the device (the ceiling)
  sae/train_sae             samples/s of `train_sae`'s fit on an on-disk store (our loader), 768 -> 3,072, k 64
  sae/train_sae_wall        `train_sae` wall time / its fit time
  eval/ten_methods          `Evaluator` (one backbone pass) + ten method rows / one plain `encode_image` pass

Models: `--models` (default ViT-B-32, ViT-B-16, ViT-L-14), built with random weights at `--precision`
(default bf16 on CUDA, fp32 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

TINY_TOWER = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                  text_cfg=dict(context_length=16, width=32, heads=2, layers=1))
# A one-block 768-wide tower on 32 px images (2 tokens per image): a 768-wide store written at almost no cost.
NARROW_TOWER = dict(embed_dim=512, vision_cfg=dict(image_size=32, patch_size=32, width=768, layers=1, head_width=64),
                    text_cfg=dict(context_length=77, width=64, heads=2, layers=1))
TINY_NARROW = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=32, width=64, layers=1, head_width=32),
                   text_cfg=dict(context_length=16, width=32, heads=2, layers=1))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _line(results: list[dict[str, Any]], name: str, value: float, unit: str, details: str = "", **extra: Any) -> None:
    print(f"device_check/{name}: {value:,.4g} {unit}" + (f" ({details})" if details else ""), flush=True)
    results.append({"name": name, "value": value, "unit": unit, "details": details, **extra})


def decoded_images(n: int, size: int, seed: int, pool: int = 256):
    """`n` preprocessed images already in memory, as an `ImageDataset` (`pool` distinct random tensors,
    cycled: 20,000 distinct 224 px images would take 12 GB)."""
    import numpy as np
    import torch

    from sae_lens_vision_steer.data.base import ImageDataset

    class Decoded(ImageDataset):
        def __init__(self) -> None:
            super().__init__(transform=None)
            self.images = torch.randn(min(pool, n), 3, size, size, generator=torch.Generator().manual_seed(seed))
            self.labels = np.arange(n, dtype=np.int64) % 10
            self.classnames = [f"class {i}" for i in range(10)]
            self.dataset_id, self.split = f"decoded-{size}px-{n}", "all"

        def load_image(self, i: int):
            return self.images[i % len(self.images)]

    return Decoded()


def write_jpegs(folder: Path, n: int, size: int, seed: int) -> Path:
    """`n` random JPEG images (`size` px, 10 class folders), written once."""
    import numpy as np
    from PIL import Image

    done = folder / ".complete"
    if done.is_file() and done.read_text() == f"{n} {size}":
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = folder / f"class_{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        # smooth random images (noise compresses badly and decodes slower than photographs)
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(d / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{n} {size}")
    return folder


def default_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return min(16, max(2, n - 1))


def check_models(args, results: list[dict[str, Any]]) -> None:
    import torch

    from sae_lens_vision_steer import HookedCLIP
    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.data.base import ImageFolderDataset

    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        kwargs = TINY_TOWER if args.tiny else {}
        model = HookedCLIP.from_pretrained(name, pretrained=None, device=args.device, **kwargs)
        model = model.eval().requires_grad_(False)
        model.set_precision(args.precision)
        size = 32 if args.tiny else 224
        hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        x = torch.randn(args.batch_size, 3, size, size, device=args.device)
        with torch.inference_mode():
            for _ in range(2):
                model.run_with_cache(x, names_filter=[hook], stop_at_layer=model.cfg.n_layers)
            _sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.forward_batches):
                model.run_with_cache(x, names_filter=[hook], stop_at_layer=model.cfg.n_layers)
            _sync(args.device)
        dt = time.perf_counter() - t0
        _line(results, f"{name}/forward_ceiling", args.forward_batches * args.batch_size / dt, "images/s",
              f"{args.forward_batches} batches of {args.batch_size}, {size} px, {args.precision}")

        for kind in ("decoded", "jpeg"):
            if kind == "decoded":
                ds = decoded_images(args.images, size, args.seed)
                workers = 0  # in-memory tensors: workers would only copy them
            else:
                folder = write_jpegs(args.work_dir / f"jpeg_{size}", args.jpeg_images, max(size, 256) if not args.tiny
                                     else 48, args.seed)
                ds = ImageFolderDataset(folder, "all", model.preprocess)
                workers = args.num_workers
            out = args.work_dir / f"cache_{name}_{kind}"
            shutil.rmtree(out, ignore_errors=True)
            _sync(args.device)
            t0 = time.perf_counter()
            cache = cache_activations(model, ds, hook, out, batch_size=args.batch_size, num_workers=workers,
                                      show_progress=False)
            _sync(args.device)
            dt = time.perf_counter() - t0
            _line(results, f"{name}/cache_{kind}", cache.n_rows / dt, "images/s",
                  f"{cache.n_rows} images, batch {args.batch_size}, {workers} workers, {args.precision}")
            shutil.rmtree(out, ignore_errors=True)
        if name == args.models.split(",")[0]:
            check_eval(args, model, results, name)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def check_eval(args, model, results: list[dict[str, Any]], name: str) -> None:
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_lens_vision_steer import ZeroShotClassifier
    from sae_lens_vision_steer.data.base import make_loader
    from sae_lens_vision_steer.evaluation import Evaluator, MethodSpec

    size = 32 if args.tiny else 224
    ds = decoded_images(args.eval_images, size, args.seed + 1)
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    d = model.cfg.d_model
    torch.manual_seed(args.seed)
    cfg = TopKSAEConfig(d_in=d, d_sae=4 * d, k=min(64, 4 * d), device=args.device)
    cfg.metadata.hook_name = hook
    cfg.metadata.activation_mean = [0.0] * d
    sae = TopKSAE(cfg).eval().requires_grad_(False)
    classifier = ZeroShotClassifier(model, ds.classnames, "single", show_progress=False,
                                    text_cache=args.work_dir / "text")
    rows = [MethodSpec(m, m) for m in ("zeroshot", "vs2", "rec_final", "rec_final_gamma")]
    rows += [MethodSpec(f"vs2_{lam}_{g}", "vs2", {"lam": lam, "gamma": g})
             for lam, g in ((1.0, 1.25), (1.5, 1.5), (2.0, 1.75), (2.5, 2.0), (3.0, 2.5), (2.1, 1.25))]

    def plain() -> float:
        _sync(args.device)
        t0 = time.perf_counter()
        classifier.evaluate(model, make_loader(ds, args.batch_size, 0), show_progress=False)
        _sync(args.device)
        return time.perf_counter() - t0

    def ours() -> float:
        _sync(args.device)
        t0 = time.perf_counter()
        ev = Evaluator(model, ds, sae, classifier, hook, args.batch_size, 0, show_progress=False)
        for spec in rows:
            ev.score(spec)
        _sync(args.device)
        if ev.n_backbone_passes != 1:
            raise RuntimeError(f"the runner made {ev.n_backbone_passes} backbone passes, expected 1")
        return time.perf_counter() - t0

    plain(), ours()  # warm-up
    a, b = plain(), ours()
    _line(results, "eval/ten_methods", b / a, "x one encode_image pass",
          f"{name}, {len(ds)} decoded images, {len(rows)} method rows on one backbone pass: {b:.3g} s vs {a:.3g} s")


def check_sae(args, results: list[dict[str, Any]]) -> None:
    import torch
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class

    from sae_lens_vision_steer import HookedCLIP
    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.training.trainer import train_sae

    torch.manual_seed(args.seed)
    tower = TINY_NARROW if args.tiny else NARROW_TOWER
    model = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, device=args.device, **tower).eval()
    hook = "blocks.0.hook_resid_post"
    store = args.work_dir / "sae_store"
    shutil.rmtree(store, ignore_errors=True)
    cache = cache_activations(model, decoded_images(args.store_images, 32, args.seed), hook, store,
                              positions="all", batch_size=4096 if not args.tiny else 64, num_workers=0,
                              show_progress=False)
    d, k, batch, samples = cache.d_in(hook), (64 if not args.tiny else 8), args.sae_batch, args.sae_samples
    n_steps = samples // batch

    def trainer_cfg() -> SAETrainerConfig:
        return SAETrainerConfig(total_training_samples=n_steps * batch, train_batch_size_samples=batch, lr=5e-4,
                                lr_end=5e-4, lr_scheduler_name="constant", lr_warm_up_steps=max(1, n_steps // 20),
                                lr_decay_steps=n_steps - max(1, n_steps // 20), device=args.device,
                                dead_feature_window=100, feature_sampling_window=max(n_steps + 1, 2000),
                                n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
                                logger=LoggingConfig(log_to_wandb=False))

    x = cache.load(hook).to(args.device)

    def memory_batches():
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        while True:
            perm = torch.randperm(len(x), device=args.device, generator=g)
            for i in range(0, len(perm) - batch + 1, batch):
                yield x[perm[i:i + batch]]

    sae_cls, cfg_cls = get_sae_training_class("topk")
    sae = sae_cls(cfg_cls(d_in=d, d_sae=4 * d, k=k, dtype="float32", device=args.device, apply_b_dec_to_input=True,
                          normalize_activations="none", decoder_init_norm=1.0, aux_loss_coefficient=1.0,
                          rescale_acts_by_decoder_norm=True))
    _sync(args.device)
    t0 = time.perf_counter()
    SAETrainer(cfg=trainer_cfg(), sae=sae, data_provider=memory_batches()).fit()
    _sync(args.device)
    mem = n_steps * batch / (time.perf_counter() - t0)
    del x
    _line(results, "sae/train_memory", mem, "samples/s",
          f"SAETrainer fed from one tensor on {args.device}, {d} -> {4 * d}, k {k}, batch {batch}, {n_steps} steps")
    t0 = time.perf_counter()
    res = train_sae(cache, hook, k=k, expansion_factor=4, batch_size=batch, total_training_samples=n_steps * batch,
                    device=args.device, out_dir=args.work_dir / "sae_run", n_checkpoints=0, overwrite=True,
                    show_progress=False)
    wall = time.perf_counter() - t0
    m = res.metrics
    _line(results, "sae/train_sae", m["train_samples_per_second"], "samples/s",
          f"train_sae fit on the {cache.n_rows}-row store ({cache.metadata['dtype']}), same settings; "
          f"{m['train_samples_per_second'] / mem:.3f} of the in-memory ceiling")
    _line(results, "sae/train_sae_wall", wall / m["fit_seconds"], "x fit time",
          f"wall {wall:.3g} s, fit {m['fit_seconds']:.3g} s, closing evaluation on "
          f"{m.get('evaluation', {}).get('train_rows')} train rows")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="backbone precision (default bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--models", default="ViT-B-32,ViT-B-16,ViT-L-14")
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: checks that every step runs")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 512; tiny 8)")
    p.add_argument("--forward-batches", type=int, default=None, help="timed batches of the forward ceiling")
    p.add_argument("--images", type=int, default=None, help="decoded images cached per model")
    p.add_argument("--jpeg-images", type=int, default=None, help="JPEG files cached per model")
    p.add_argument("--eval-images", type=int, default=None)
    p.add_argument("--store-images", type=int, default=None, help="images of the SAE store (2 rows each)")
    p.add_argument("--sae-samples", type=int, default=None)
    p.add_argument("--sae-batch", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None, help="JPEG decoding workers (default: from the cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    big = dict(batch_size=512, forward_batches=20, images=20000, jpeg_images=5000, eval_images=10000,
               store_images=500000, sae_samples=500 * 4096, sae_batch=4096)
    tiny = dict(batch_size=8, forward_batches=2, images=24, jpeg_images=16, eval_images=16, store_images=256,
                sae_samples=1024, sae_batch=64)
    for key, value in (tiny if args.tiny else big).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny and args.models == p.get_default("models"):
        args.models = "ViT-B-32"
    if args.num_workers is None:
        args.num_workers = 0 if args.tiny else default_workers()
    own_work_dir = args.work_dir is None
    args.work_dir = Path(tempfile.mkdtemp(prefix="device_check_")) if own_work_dir else args.work_dir
    args.work_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# device_check on {args.device} ({gpu}), torch {torch.__version__}, {os.cpu_count()} cores, "
          f"precision {args.precision}, models {args.models}{', tiny' if args.tiny else ''}", flush=True)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        check_models(args, results)
        check_sae(args, results)
    finally:
        if own_work_dir:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    print(f"# device_check done in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"device": args.device, "name": gpu, "torch": torch.__version__,
                                             "precision": args.precision, "tiny": args.tiny,
                                             "figures": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
