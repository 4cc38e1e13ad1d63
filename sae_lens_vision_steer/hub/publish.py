"""Publish a trained vision SAE to the Hugging Face Hub, and load one back (from the Hub or a folder).

The Hub layout is SAELens' (`upload_saes_to_huggingface`): `<sae_id>/cfg.json`,
`<sae_id>/sae_weights.safetensors`, `<sae_id>/sparsity.safetensors` (and `runner_cfg.json` if present),
so `sae_lens.SAE.from_pretrained(repo_id, sae_id)` loads a published SAE with no code from this package.
We add a model card (README.md) at the root.

Why not call `upload_saes_to_huggingface` itself: it (1) calls `create_repo(repo_id)` with no way to make
the repository private, (2) uploads each SAE with `HfApi.upload_folder`, which with `hf_xet` installed
(huggingface_hub >= 1) may split an upload into several commits, and (3) writes its default README in a
second commit, and only when no README exists, so a re-published SAE keeps a stale card. An upload
interrupted between those commits leaves a repository with weights but no (or a wrong) card. We keep its
layout and file allow-list and make exactly one `HfApi.create_commit` holding every file, so a failed
upload changes nothing and a retry redoes the same commit (unchanged files are skipped by the Hub client).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sae_lens import SAE
from sae_lens.constants import (
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SPARSITY_FILENAME,
)
from safetensors import safe_open

from ..core.errors import MissingInputError, UsageError
from ..core.names import inside
from ..sae.loading import check_sae_id, load_vision_sae
from ..sae.metadata import portable_metadata, vision_metadata
from .model_card import (
    is_vision_steer_card,
    load_eval_results,
    merge_model_card,
    sae_card_section,
)

# The files of one SAE folder that go to the Hub: SAELens' upload allow-list, in upload order.
SAE_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME, RUNNER_CFG_FILENAME)
README = "README.md"
EVAL_RESULTS_FILENAME = "results.json"


@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    sae_id: str
    revision: str
    files: tuple[str, ...]  # paths in the repository, as uploaded (or written by a dry run)
    deleted: tuple[str, ...] = ()  # stale files of an earlier upload of this sae_id, removed in the same commit
    commit_url: str | None = None
    dry_run_dir: Path | None = None
    eval_results: Path | None = None


# --------------------------------------------------------------------------------------------- checks
def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    # SAE.from_pretrained treats an unknown release with a "/" as a repo id; a release name would win.
    if repo_id.count("/") != 1:
        raise UsageError(f"repo id {repo_id!r} should look like ORG/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"invalid repo id {repo_id!r}: {e}") from None
    if repo_id in get_pretrained_saes_directory():
        raise UsageError(f"{repo_id!r} is a SAELens release name; SAE.from_pretrained would not read the repo")


def _load_checked_sae(sae_dir: Path) -> SAE:
    """Load the folder the way the Hub loader will, and check what the card and the steering code need."""
    if not (sae_dir / SAE_CFG_FILENAME).is_file() or not (sae_dir / SAE_WEIGHTS_FILENAME).is_file():
        raise MissingInputError(
            f"{sae_dir} is not a SAELens SAE folder: it needs {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME} "
            "(an SAE from another library: write it as one with `vision-steer convert` / sae.importing.import_sae)"
        )
    sae, _ = load_vision_sae(sae_dir)
    missing = [k for k in ("hook_name", "model_name") if not sae.cfg.metadata.get(k)]
    if missing:
        raise UsageError(f"{sae_dir}: the SAE's cfg.metadata lacks {missing}; it does not say which CLIP hook it is for")
    sparsity = sae_dir / SPARSITY_FILENAME
    if sparsity.is_file():
        with safe_open(sparsity, framework="pt") as f:
            # SAELens' Hub loader reads the tensor named "sparsity"; a wrong one would pass upload and fail later.
            if "sparsity" not in f.keys() or list(f.get_slice("sparsity").get_shape()) != [sae.cfg.d_sae]:
                raise UsageError(f"{sparsity} should hold a tensor 'sparsity' of shape [{sae.cfg.d_sae}]")
    return sae


def find_eval_results(sae_dir: Path, eval_results: str | Path | None | bool) -> Path | None:
    """The results.json to put in the card: the given one, else one in or next to the SAE folder.

    `eval_results=False` means none.
    """
    if eval_results is False:
        return None
    if eval_results not in (None, True):
        path = Path(eval_results)  # type: ignore[arg-type]
        if not path.is_file():
            raise MissingInputError(f"eval results file {path} not found")
        return path
    for candidate in (sae_dir / EVAL_RESULTS_FILENAME, sae_dir.parent / EVAL_RESULTS_FILENAME):
        if candidate.is_file():
            return candidate
    return None


def _check_results_match(results: dict[str, Any], sae: SAE, path: Path) -> None:
    """Refuse eval results that were not made with this SAE on its pretrained CLIP model.

    `vision-steer eval` records the model (`model`, `pretrained`, `random_weights`), the hook and a
    summary of the SAE (`sae`: d_in, d_sae, k, hook_name, heldout_fvu) in `config`.
    """
    config = results.get("config") or {}
    meta = sae.cfg.metadata
    hint = "; pass the right --eval-results (or --no-eval-results)"
    if config.get("random_weights"):
        raise UsageError(f"{path} was made with a randomly initialised CLIP, not {meta.get('pretrained')!r}" + hint)
    summary = config.get("sae") if isinstance(config.get("sae"), dict) else {}
    ours = {"model": meta.get("model_name"), "pretrained": meta.get("pretrained"), "hook_name": meta.get("hook_name"),
            "sae.d_in": sae.cfg.d_in, "sae.d_sae": sae.cfg.d_sae, "sae.k": getattr(sae.cfg, "k", None),
            "sae.hook_name": meta.get("hook_name"), "sae.heldout_fvu": meta.get("heldout_fvu")}
    for key, mine in ours.items():
        theirs = summary.get(key[4:]) if key.startswith("sae.") else config.get(key)
        if theirs is not None and mine is not None and theirs != mine:
            raise UsageError(f"{path} records {key}={theirs!r} but the SAE has {mine!r}" + hint)


# --------------------------------------------------------------------------------------------- publish
def _stage(root: Path, sae_dir: Path, sae_id: str, card: str) -> list[str]:
    """Write the repository files under `root` (same relative paths as on the Hub); return those paths."""
    paths = []
    check_sae_id(sae_id)
    inside(root, root / sae_id, "staged SAE folder").mkdir(parents=True, exist_ok=True)
    for name in SAE_FILES:
        src = sae_dir / name
        cfg = json.loads(src.read_text()) if name == SAE_CFG_FILENAME else None
        meta = cfg.get("metadata") if isinstance(cfg, dict) else None
        if isinstance(meta, dict) and portable_metadata(meta) != meta:  # published metadata: no local paths
            cfg["metadata"] = portable_metadata(meta)
            (root / sae_id / name).write_text(json.dumps(cfg) + "\n", encoding="utf-8")
            paths.append(f"{sae_id}/{name}")
        elif src.is_file():
            shutil.copyfile(src, root / sae_id / name)
            paths.append(f"{sae_id}/{name}")
    (root / README).write_text(card, encoding="utf-8")
    paths.append(README)
    return paths


def _card_section(repo_id: str, sae_id: str, sae: SAE, eval_path: Path | None, revision: str) -> str:
    cfg = sae.cfg
    sae_cfg = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": getattr(cfg, "k", None), "architecture": cfg.architecture()}
    meta = portable_metadata(vision_metadata(sae))
    results = None
    if eval_path is not None:
        results = load_eval_results(eval_path)
        _check_results_match(results, sae, eval_path)
    return sae_card_section(repo_id, sae_id, sae_cfg, meta, results, revision=revision)


def publish_sae(
    sae_dir: str | Path,
    repo_id: str,
    sae_id: str,
    private: bool = False,
    revision: str = "main",
    eval_results: str | Path | None | bool = None,
    dry_run_dir: str | Path | None = None,
    commit_message: str | None = None,
) -> PublishResult:
    """Upload the SAE folder `sae_dir` to `repo_id` under `<sae_id>/`, with a model card, in one commit.

    `eval_results`: a `vision-steer eval` results.json for the card; default: `results.json` in or next to
    `sae_dir` if there is one; `False`: none. `dry_run_dir`: write the files that would be uploaded there
    (same paths as on the Hub) and upload nothing; it must not exist or be empty.
    The token comes from `hf auth login` or `HF_TOKEN`. Safe to re-run after a failure: one commit holds
    everything, and a re-run with the same files changes nothing.
    """
    sae_dir = Path(sae_dir)
    check_repo_id(repo_id)
    check_sae_id(sae_id)
    if not revision or revision != revision.strip():
        raise UsageError(f"invalid revision {revision!r}")
    sae = _load_checked_sae(sae_dir)
    eval_path = find_eval_results(sae_dir, eval_results)
    section = _card_section(repo_id, sae_id, sae, eval_path, revision)

    if dry_run_dir is not None:
        out = _write_dry_run(Path(dry_run_dir), sae_dir, sae_id, merge_model_card(None, sae_id, section))
        files = tuple(sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()))
        return PublishResult(repo_id, sae_id, revision, files, dry_run_dir=out, eval_results=eval_path)
    return _upload(sae_dir, repo_id, sae_id, section, private, revision, eval_path, commit_message)


def _write_dry_run(out: Path, sae_dir: Path, sae_id: str, card: str) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"dry-run folder {out} exists and is not empty; give a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _stage(tmp, sae_dir, sae_id, card)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)  # all files appear at once
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _upload(sae_dir: Path, repo_id: str, sae_id: str, section: str, private: bool, revision: str,
            eval_path: Path | None, commit_message: str | None) -> PublishResult:
    from huggingface_hub import (
        CommitOperationAdd,
        CommitOperationDelete,
        HfApi,
        get_token,
    )

    # HfApi finds the token itself (HF_TOKEN, then the stored login); we only check there is one.
    if get_token() is None:
        raise UsageError("no Hugging Face token: run `hf auth login` or set the HF_TOKEN environment variable")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.repo_info(repo_id, revision=revision)
    if private and not info.private:
        raise UsageError(f"{repo_id} already exists and is public; refusing to upload with --private")
    remote = api.list_repo_files(repo_id, revision=info.sha)
    existing_card = None
    if README in remote:
        existing_card = Path(api.hf_hub_download(repo_id, README, revision=info.sha)).read_text(encoding="utf-8")
        if not is_vision_steer_card(existing_card):
            warnings.warn(f"{repo_id} has a README.md not written by vision-steer; replacing it (the old one stays "
                          "in the repository history)", stacklevel=3)
    card = merge_model_card(existing_card, sae_id, section)

    with tempfile.TemporaryDirectory() as tmp:
        paths = _stage(Path(tmp), sae_dir, sae_id, card)
        # Files of an earlier upload of this SAE that this one lacks (e.g. sparsity.safetensors) would
        # otherwise sit next to the new weights and describe a different SAE.
        stale = sorted(p for p in remote if PurePosixPath(p).parent == PurePosixPath(sae_id) and p not in paths)
        operations = [CommitOperationDelete(path_in_repo=p) for p in stale]
        operations += [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(Path(tmp) / p)) for p in paths]
        # parent_commit: if someone else committed since we read the card, fail instead of dropping their edit.
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message or f"Upload SAE {sae_id}",
            revision=revision, parent_commit=info.sha,
        )
    return PublishResult(repo_id, sae_id, revision, tuple(paths), tuple(stale),
                         commit_url=getattr(commit, "commit_url", None), eval_results=eval_path)
