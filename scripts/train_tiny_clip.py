"""Train the small real CLIP that every offline demo uses (`assets/tiny-clip-tinyimagenet/`).

An open_clip `CLIP` (32 px images, patch 8, 4 blocks of width 128; a 2-block text tower of width 64)
trained from scratch on the Tiny-ImageNet training images with an image-vs-class-prompt
cross-entropy: every step encodes each of the 200 classes with one prompt template drawn at random
from CLIP's 80 ImageNet templates, and each image is classified against those 200 prompt embeddings
(`logit_scale * normalize(image) @ normalize(text).T`, open_clip's learnable temperature). The model,
tokenizer and image transform are open_clip's own; the weights are saved as float16 in open_clip's
`local-dir:` layout (`open_clip_config.json` + `open_clip_model.safetensors`), so that

    open_clip.create_model_and_transforms("local-dir:assets/tiny-clip-tinyimagenet")
    HookedCLIP.from_pretrained("local-dir:assets/tiny-clip-tinyimagenet")
    vision-steer zeroshot --model local-dir:assets/tiny-clip-tinyimagenet ...

load it. Fixed seed; about 20 minutes on 2 CPU cores:

    python scripts/train_tiny_clip.py --data-dir ../shared/datasets/tiny-imagenet-200 \
        --out assets/tiny-clip-tinyimagenet [--epochs 20 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import safetensors.torch
import torch
import torch.nn.functional as F
from open_clip.push_to_hf_hub import save_config_for_hf
from tqdm.auto import tqdm

from sae_lens_vision_steer.data import load_image_dataset
from sae_lens_vision_steer.data.resources import templates_for

MODEL_CFG = {
    "embed_dim": 128,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 4, "width": 128, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def preload(data_dir: str, split: str, preprocess, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image through the model's own evaluation transform, once (32 px tensors fit in memory)."""
    ds = load_image_dataset("tiny-imagenet", split, data_dir, transform=preprocess, limit=limit)
    images = torch.empty(len(ds), 3, 32, 32)
    for i in tqdm(range(len(ds)), desc=f"decode {split}", unit="img", mininterval=5):
        images[i] = ds[i][0]
    return images, torch.as_tensor(ds.subset_labels), ds.classnames


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random 32 px crop of the 4 px reflect-padded image."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + 32, dx:dx + 32]


def tokenize_all(tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Tokens for every (template, class) pair: [n_templates, n_classes, context]."""
    return torch.stack([tokenizer([t.format(c) for c in classnames]) for t in templates])


@torch.no_grad()
def zero_shot(model, tokens_TCL: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 / top-5 (percent) with the full template ensemble (normalise, average, normalise)."""
    model.eval()
    w = torch.stack([F.normalize(model.encode_text(t), dim=-1) for t in tokens_TCL]).mean(0)
    w = F.normalize(w, dim=-1)
    top1 = top5 = 0
    for i in range(0, len(images), 1000):
        logits = F.normalize(model.encode_image(images[i:i + 1000]), dim=-1) @ w.T
        top = logits.topk(5, dim=-1).indices
        y = labels[i:i + 1000]
        top1 += (top[:, 0] == y).sum().item()
        top5 += (top == y[:, None]).any(-1).sum().item()
    model.train()
    return 100 * top1 / len(images), 100 * top5 / len(images)


def save(model, out: Path, report: dict) -> None:
    """open_clip's `local-dir:` layout, float16 weights, written to a temp folder and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, tmp / "open_clip_model.safetensors")
    save_config_for_hf(model, tmp / "open_clip_config.json", model_config=MODEL_CFG)
    (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    if out.exists():
        if not (out / "open_clip_config.json").is_file():
            raise SystemExit(f"{out} exists and is not a saved model folder; not overwriting it")
        old = out.with_name(f".{out.name}.old")
        out.rename(old)
        tmp.rename(out)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="a tiny-imagenet-200/ folder")
    p.add_argument("--out", default="assets/tiny-clip-tinyimagenet")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core CPU: 2 OpenMP threads wait for each other)")
    p.add_argument("--limit", type=int, default=None, help="train on this many images (smoke tests)")
    p.add_argument("--eval-val", action="store_true", help="report zero-shot on the val split at the end")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    # build through open_clip's factory from a weight-less local-dir config, so the model, the
    # evaluation transform and the tokenizer are exactly what `local-dir:<out>` loads later
    with tempfile.TemporaryDirectory() as cfg_dir:
        (Path(cfg_dir) / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{cfg_dir}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{cfg_dir}")

    t0 = time.time()
    images, labels, classnames = preload(args.data_dir, "train", preprocess, args.limit)
    templates = templates_for("imagenet")
    tokens_TCL = tokenize_all(tokenizer, classnames, templates)
    if (tokens_TCL[..., -1] != 0).any():
        raise SystemExit("a prompt does not fit the context length; raise text_cfg.context_length")
    n, n_classes = len(images), len(classnames)
    steps_per_epoch = n // args.batch_size
    total = steps_per_epoch * args.epochs
    decay = [p_ for name, p_ in model.named_parameters() if p_.ndim >= 2 and "embedding" not in name]
    no_decay = [p_ for name, p_ in model.named_parameters() if not (p_.ndim >= 2 and "embedding" not in name)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        frac = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
        return args.lr * 0.5 * (1 + math.cos(math.pi * frac))

    model.train()
    step, log = 0, []
    bar = tqdm(total=total, desc="train", unit="step")
    t_train = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen)
        run_loss = run_acc = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            x = augment(images[idx], gen)
            y = labels[idx]
            pick = torch.randint(0, len(templates), (n_classes,), generator=gen)
            text = tokens_TCL[pick, torch.arange(n_classes)]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(text), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            run_loss += loss.item()
            run_acc += (logits.argmax(-1) == y).float().mean().item()
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        log.append({"epoch": epoch, "loss": run_loss / steps_per_epoch,
                    "train_acc_one_template": 100 * run_acc / steps_per_epoch,
                    "elapsed_s": round(time.time() - t_train, 1)})
        print(json.dumps(log[-1]), flush=True)
    bar.close()
    train_s = time.time() - t_train
    report = {"model_cfg": MODEL_CFG, "args": {**vars(args), "data_dir": Path(args.data_dir).name},  # no local path "train_seconds": round(train_s, 1),
              "total_seconds_incl_decode": round(time.time() - t0, 1), "torch": torch.__version__,
              "open_clip": open_clip.__version__, "epochs": log,
              "n_train_images": n, "n_parameters": sum(p_.numel() for p_ in model.parameters())}
    report["train_zero_shot_top1_top5"] = zero_shot(model, tokens_TCL, images[::4], labels[::4])
    if args.eval_val:
        val_x, val_y, _ = preload(args.data_dir, "val", preprocess, args.limit)
        report["val_zero_shot_top1_top5"] = zero_shot(model, tokens_TCL, val_x, val_y)
    print(json.dumps({k: report[k] for k in report if k.endswith("top5") or k == "train_seconds"}), flush=True)
    save(model, Path(args.out), report)
    print(f"saved {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
