"""`vision-steer publish`: upload a trained SAE folder to the Hugging Face Hub with a model card."""

from __future__ import annotations

import argparse

HELP = "publish a trained SAE to the Hugging Face Hub (SAELens layout, with a model card)"
DESCRIPTION = (
    HELP + ". Uploads <sae-id>/cfg.json, sae_weights.safetensors, sparsity.safetensors and README.md in one "
    "commit. The token comes from `hf auth login` or the HF_TOKEN environment variable."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE folder written by `vision-steer train` (cfg.json inside)")
    p.add_argument("--repo-id", required=True, help="Hub repository, ORG/NAME (created if missing)")
    p.add_argument("--sae-id", required=True, help="folder of this SAE in the repository, e.g. blocks.11.hook_resid_post")
    p.add_argument("--private", action="store_true", help="create the repository private (refuses an existing public one)")
    p.add_argument("--revision", default="main", help="branch to commit to (created if missing)")
    results = p.add_mutually_exclusive_group()
    results.add_argument("--eval-results", default=None,
                         help="`vision-steer eval` results.json for the card (default: results.json in or next to --sae)")
    results.add_argument("--no-eval-results", action="store_true", help="put no accuracy table in the card")
    p.add_argument("--dry-run", metavar="OUT_DIR", default=None,
                   help="write the files that would be uploaded to OUT_DIR (Hub paths) and upload nothing")


def run(args: argparse.Namespace) -> int:
    from ..hub.publish import publish_sae

    eval_results = False if args.no_eval_results else args.eval_results
    res = publish_sae(args.sae, args.repo_id, args.sae_id, private=args.private, revision=args.revision,
                      eval_results=eval_results, dry_run_dir=args.dry_run)
    print(f"eval results in the card: {res.eval_results or 'none'}")
    if res.dry_run_dir is not None:
        print(f"dry run: wrote {len(res.files)} files to {res.dry_run_dir} (nothing uploaded):")
        for path in res.files:
            print(f"  {path}  ({(res.dry_run_dir / path).stat().st_size:,} bytes)")
        return 0
    print(f"uploaded to {args.repo_id}@{res.revision} in one commit: {', '.join(res.files)}")
    if res.deleted:
        print(f"removed stale files of the earlier upload: {', '.join(res.deleted)}")
    if res.commit_url:
        print(f"commit: {res.commit_url}")
    print(f'load with: SAE.from_pretrained("{args.repo_id}", "{args.sae_id}")  or  '
          f'load_vision_sae("{args.repo_id}", "{args.sae_id}")')
    return 0
