"""Caching from a stream vs caching the same images from local files (issue 15, item 3).

N Tiny-ImageNet validation JPEGs (the bytes as they are) are written once, in the local data set's
order, as WebDataset tar shards (`<key>.jpg` + `<key>.cls`, 4 shards) and as a `datasets` parquet
repo (README split info, as on the Hub). Three variants cache the final block's CLS of a random-weight
ViT-B-32 (the real forward cost) side by side, interleaved:

  A  local   `load_image_dataset("tiny-imagenet", data_dir=...)`, `cache_activations(num_workers=2)`
             (the CLI's default)
  B  tars    `load_image_dataset("webdataset", data_dir=<shards>, stream=True)` (num_workers=0 and the
             stream's reader thread, as `vision-steer cache --stream` runs it)
  C  hf      `load_image_dataset(<parquet repo folder>, stream=True)`: a `datasets` stream

How the stream is served: local tar shards read by `WebDatasetSource`, the code path of Hub WebDataset
shards (those differ only in the file object: `HfFileSystem().open` instead of `open`); the parquet
repo through `datasets.load_dataset(..., streaming=True)` from a local folder. No network.

Figures: B/A and C/A throughput (target >= 0.9 for B); every variant's shard bytes are checked equal.

    python benchmarks/streamed_cache.py                    # 512 images, 3 rounds
    python benchmarks/streamed_cache.py --n-images 64 --reps 1 --warmup 0   # smoke
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    TINY_IMAGENET_DIR, Figure, interleave, load_average, print_header, quiet_progress, report, set_threads, summarize,
)

quiet_progress()

from _setup import add_common_args, build_model, final_hook, tiny_imagenet  # noqa: E402


def write_replicas(ds, root: Path, n_shards: int = 4) -> tuple[Path, Path]:
    """The data set's images, in its order, as tar shards and as a parquet `datasets` repo."""
    wds, repo = root / "wds", root / "hf_repo"
    if (wds / "done").is_file() and (repo / "README.md").is_file():
        return wds, repo
    import datasets

    idx = ds.indices if ds.indices is not None else range(len(ds.paths))
    items = [(Path(ds.paths[i]).read_bytes(), int(ds.labels[i])) for i in idx]
    (wds / "val").mkdir(parents=True, exist_ok=True)
    per = -(-len(items) // n_shards)
    for s in range(n_shards):
        with tarfile.open(wds / "val" / f"{s}.tar", "w") as tar:
            for k in range(s * per, min((s + 1) * per, len(items))):
                for ext, data in (("jpg", items[k][0]), ("cls", str(items[k][1]).encode())):
                    info = tarfile.TarInfo(f"{k:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (wds / "done").write_text("")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=200)})
    hf = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in items],
                                     "label": [lab for _, lab in items]}, features=feats)
    (repo / "data").mkdir(parents=True, exist_ok=True)
    hf.to_parquet(repo / "data" / "val-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\ndataset_info:\n"  # the features come from the parquet file's own schema metadata
        f"  splits:\n  - name: val\n    num_bytes: {sum(len(b) for b, _ in items)}\n    num_examples: {len(items)}\n"
        "configs:\n- config_name: default\n  data_files:\n  - split: val\n    path: data/val-*\n---\n")
    return wds, repo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    add_common_args(p, reps=3)
    args = p.parse_args(argv)

    from sae_lens_vision_steer import load_image_dataset
    from sae_lens_vision_steer.activation_cache import cache_activations

    set_threads(args.threads)
    print_header("streamed_cache", args)
    model = build_model("vit-b-32", args.seed)
    hook = final_hook(model)
    local = tiny_imagenet("val", args.n_images, model.preprocess, args.data_dir)
    root = args.work_dir / f"streamed_cache_{args.n_images}"
    wds, repo = write_replicas(local, root)
    out = {}

    def run(name, ds, workers):
        out[name] = cache_activations(model, ds, hook, root / f"cache_{name}", batch_size=args.batch_size,
                                      num_workers=workers, show_progress=False, overwrite=True)

    def variant_local():
        run("local", tiny_imagenet("val", args.n_images, model.preprocess, args.data_dir), 2)

    def variant_tars():
        ds = load_image_dataset("webdataset", "val", wds, transform=model.preprocess, stream=True)
        run("tars", ds, 0)
        ds.close()

    def variant_hf():
        ds = load_image_dataset(str(repo), "val", transform=model.preprocess, stream=True)
        run("hf", ds, 0)
        ds.close()

    loads = []
    t = interleave({"local": variant_local, "tars": variant_tars, "hf": variant_hf}, reps=args.reps,
                   warmup=args.warmup, on_round=lambda r, _: loads.append(load_average()[0]))
    shards = {name: [(c.root / r["file"]).read_bytes() for r in c.metadata["shards"]] for name, c in out.items()}
    same = shards["tars"] == shards["local"] == shards["hf"]
    print(f"# shard bytes identical across local / tars / hf: {same}; load average per round {loads}", flush=True)
    if not same:
        raise SystemExit("streamed caches differ from the local-files cache")
    desc = (f"{args.n_images} images, ViT-B-32 random weights, final-block CLS, batch {args.batch_size}; "
            f"shard bytes identical; load {min(loads):.1f}-{max(loads):.1f}")
    for name, label, target in (("tars", "WebDataset tar shards, streamed (num_workers=0 + reader thread)", ">= 0.9"),
                                ("hf", "datasets stream of a parquet repo (num_workers=0 + reader thread)", None)):
        a, b = summarize(t.wall["local"]), summarize(t.wall[name])
        report(Figure(f"streamed_cache/{name}_over_local", a, b, "speed", "local files (num_workers=2)", label, target,
                      desc + f"; {args.n_images / a.median:.1f} vs {args.n_images / b.median:.1f} images/s"),
               args.json_out)
        # Process CPU time: the local variant's decoding runs in worker processes (not counted), the streamed
        # ones' in this process, so this ratio shows the work moved into the process rather than speed.
        report(Figure(f"streamed_cache/{name}_over_local_cpu", summarize(t.cpu["local"]), summarize(t.cpu[name]),
                      "time", "local files, process CPU s", label + ", process CPU s", None, desc), args.json_out)
    print(json.dumps({"n_shards": out["local"].n_shards}), flush=True)


if __name__ == "__main__":
    main()
