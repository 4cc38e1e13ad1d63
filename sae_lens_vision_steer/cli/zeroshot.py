"""`vision-steer zeroshot`: plain CLIP zero-shot accuracy on a data set."""

from __future__ import annotations

import argparse
import time

from .common import (
    add_data_args,
    add_model_args,
    add_progress_arg,
    add_text_cache_args,
    load_data,
    load_model,
    peak_rss_mib,
    resolve_model_args,
    resolve_text_cache,
    write_json_atomic,
)

HELP = "zero-shot classification accuracy of a CLIP model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--templates", default=None,
                   help="template set: cifar (18), imagenet (80), cub, single; default: the data set's CLIP set")
    add_text_cache_args(p)
    p.add_argument("--out", default=None, help="results JSON (default: zeroshot_<dataset>_<split>.json)")
    add_progress_arg(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.ood import dataset_templates
    from ..data.resources import DEFAULT_TEMPLATES
    from ..zeroshot.classifier import ZeroShotClassifier

    t0 = time.perf_counter()
    resolve_model_args(args)
    out = args.out or f"zeroshot_{args.dataset.replace('/', '_').replace(':', '_')}_{args.split}.json"
    from pathlib import Path

    from ..core.fileio import check_writable_dir

    if Path(out).is_dir():
        raise IsADirectoryError(21, "--out is a folder; give a file name", out)
    check_writable_dir(Path(out).absolute().parent, "folder of --out")
    model = load_model(args)
    data = load_data(args, model)
    templates = args.templates or dataset_templates(data, DEFAULT_TEMPLATES.get(data.dataset_id, "single"))
    clf = ZeroShotClassifier(model, data.classnames, templates, show_progress=not args.no_progress,
                             text_cache=resolve_text_cache(args))
    t1 = time.perf_counter()
    res = clf.evaluate(model, data, batch_size=args.batch_size, num_workers=args.num_workers,
                       show_progress=not args.no_progress)
    t2 = time.perf_counter()
    ips = res.n_images / (t2 - t1)
    print(f"{data.dataset_id}/{data.split}: {res.n_images} images evaluated"
          + (f" ({res.n_skipped} unreadable skipped)" if res.n_skipped else ""))
    print(f"top-1 {res.top1:.2f}%  top-5 {res.top5:.2f}%  mean per-class {res.mean_per_class:.2f}%")
    print(f"time {t2 - t1:.1f} s ({ips:.1f} images/s; setup {t1 - t0:.1f} s), peak RSS {peak_rss_mib():.0f} MiB,"
          f" torch threads {torch.get_num_threads()}")
    write_json_atomic(out, {
        "model": model.cfg.model_name, "pretrained": model.cfg.pretrained,
        "dataset": data.dataset_id, "split": data.split, "templates": templates, **res.summary(),
        "seconds": t2 - t1, "setup_seconds": t1 - t0, "text_cache": clf.text_cache_status, "images_per_second": ips, "peak_rss_mib": peak_rss_mib(),
        "classnames": data.classnames, "per_class_acc": res.per_class_acc, "predictions": res.predictions,
        "labels": res.labels,
    })
    print(f"wrote {out}")
    return 0
